"""--optimizer muon: MuonAdamW against torch.optim.Muon and torch.optim.AdamW themselves; its checkpoints."""

import torch

from gpt2repro.config import TrainConfig
from gpt2repro.model import GPT, GPTConfig
from gpt2repro.optim import MuonAdamW, is_muon_matrix
from gpt2repro.presets import PRESETS

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=96)
CFG = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=4e-3, weight_decay=0.1, dtype="bfloat16")  # NS in bf16, as torch


def grads_of(model, seed):
    batch = torch.randint(0, CONFIG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    model(batch[:, :-1], batch[:, 1:], return_logits=False)[1].backward()


def test_muon_adamw_is_torch_muon_for_the_blocks_matrices_and_fused_adamw_for_the_rest():
    torch.manual_seed(0)
    ours, theirs = GPT(CONFIG), GPT(CONFIG)
    theirs.load_state_dict(ours.state_dict())
    optimizer = MuonAdamW(ours, CFG)
    named = list(theirs.named_parameters())
    muon = torch.optim.Muon(
        [p for n, p in named if is_muon_matrix(n)],
        lr=CFG.muon_lr,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        adjust_lr_fn="match_rms_adamw",
    )
    rest = [p for n, p in named if not is_muon_matrix(n)]
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=CFG.lr,
        betas=(0.9, 0.95),
        fused=True,
    )
    assert sum(p.numel() for g in muon.param_groups for p in g["params"]) == 2 * 12 * 32 * 32
    for step in range(4):
        for model in (ours, theirs):
            grads_of(model, step)
        optimizer.step()
        muon.step()
        adamw.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_step_with_non_finite_gradients_changes_nothing():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = MuonAdamW(model, CFG)
    grads_of(model, 0)
    optimizer.step()
    before = {n: p.clone() for n, p in model.named_parameters()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    grads_of(model, 1)
    optimizer.found_inf = torch.ones(())  # as GradScaler hands it over
    optimizer.grad_scale = None
    optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for p, s in optimizer.state.items():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in s.items())


def test_muon_runs_resume_bitwise(shakespeare_data, tmp_path):
    import json

    from gpt2repro import config as C
    from gpt2repro import distributed as D
    from gpt2repro import train

    base = PRESETS["shakespeare-cpu"].replace(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=32,
        batch_size=4,
        max_steps=6,
        log_interval=1,
        eval_interval=1000,
        ckpt_interval=3,
        eval_tokens=64,
        device="cpu",
        optimizer="muon",
        muon_lr=0.02,
    )

    def losses(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    train.fit(C.resolve(base, 1), str(shakespeare_data), tmp_path / "straight", D.DistInfo())
    train.fit(C.resolve(base.replace(max_steps=3), 1), str(shakespeare_data), tmp_path / "resumed", D.DistInfo())
    train.fit(C.resolve(base, 1), str(shakespeare_data), tmp_path / "resumed", D.DistInfo())
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bitwise, Muon's momentum included
    assert len(losses(tmp_path / "straight")) == 6


def test_the_planner_counts_one_momentum_for_the_muon_matrices():
    from gpt2repro import memory

    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, pad_vocab_multiple=64)
    plans = {
        kind: memory.estimate(config, batch_size=16, world_size=8, dtype="bfloat16", strategy="fsdp", optimizer=kind)
        for kind in ("adamw", "muon")
    }
    matrices = 12 * 12 * 768 * 768  # the blocks' four matrices: 85M of GPT-2 124M's parameters
    model = GPT(config)
    assert matrices == sum(p.numel() for n, p in model.named_parameters() if is_muon_matrix(n))
    assert plans["adamw"].optimizer - plans["muon"].optimizer == 4 * matrices // 8
    assert "Muon" in memory.format_plan(plans["muon"], 80 * memory.GiB)
