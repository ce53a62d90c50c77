"""FP8 training (torchao's float8 recipe), run here through torchao's CPU emulation of the FP8 matmuls."""

import numpy as np
import pytest
import torch

from gpt2repro import fp8
from gpt2repro.model import GPT, GPTConfig
from gpt2repro.settings import Machine, settle

pytest.importorskip("torchao.float8")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
# Bytes as tokens: a small vocabulary keeps the bf16 lm_head (slow on a CPU) out of the way.
CONFIG = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)


def test_only_the_blocks_matmuls_become_fp8_and_names_stay():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    names = list(model.state_dict())
    fp8.convert(model)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {
        f"transformer.h.{i}.{name}"
        for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert not isinstance(model.lm_head, Float8Linear)  # tied to wte; the fused loss's matmuls stay bf16
    assert list(model.state_dict()) == names  # checkpoints move between fp8 and bf16 runs


def test_fp8_training_follows_bf16_from_the_same_weights():
    tokens = np.frombuffer((REPO / "examples" / "tinyshakespeare.txt").read_bytes(), dtype=np.uint8)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(tokens) - 65, size=(60, 8))
    curves = {}
    for use_fp8 in (False, True):
        torch.manual_seed(0)
        model = GPT(CONFIG)
        if use_fp8:
            fp8.convert(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curves[use_fp8] = []
        for rows in starts:
            batch = torch.from_numpy(np.stack([tokens[s : s + 65] for s in rows]).astype(np.int64))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(batch[:, :-1], batch[:, 1:], return_logits=False)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curves[use_fp8].append(loss.item())
    bf16, fp8_losses = np.array(curves[False]), np.array(curves[True])
    assert bf16[-10:].mean() < bf16[:5].mean() - 1, bf16  # it learned
    assert np.abs(fp8_losses[-10:].mean() / bf16[-10:].mean() - 1) < 0.01, (fp8_losses, bf16)  # within 1%


def test_fp8_needs_an_fp8_gpu():
    with pytest.raises(ValueError, match="compute capability 8.9 or newer"):
        fp8.check_supported("cpu")


def _one_step(model, cfg, optimizer):
    batch = torch.randint(0, CONFIG.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(batch[:, :-1], batch[:, 1:], return_logits=False)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_checkpoints_resume_across_fp8_both_ways(tmp_path):
    """fp8 changes no parameter name: a bf16 run's checkpoint resumes in an fp8 run, and back."""
    from gpt2repro import checkpoint, engine, train
    from gpt2repro import distributed as D
    from gpt2repro.config import TrainConfig
    from gpt2repro.shards import write_json_atomic

    shape = {f: getattr(CONFIG, f) for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    cfg = TrainConfig(**shape, dtype="bfloat16", batch_size=4)
    info = D.DistInfo()
    for saved_fp8 in (False, True):
        run_dir = tmp_path / f"from_fp8_{saved_fp8}"
        run_dir.mkdir()
        write_json_atomic(run_dir / "config.json", {**cfg.replace(fp8=saved_fp8).to_dict(), "world_size": 1})
        models = []
        for use_fp8 in (saved_fp8, not saved_fp8):
            torch.manual_seed(0)
            model = GPT(CONFIG)
            if use_fp8:
                fp8.convert(model)
            models.append((model, engine.make_optimizer(model, cfg), engine.make_scaler("bfloat16", "cpu")))
        (source, source_opt, scaler), (target, target_opt, target_scaler) = models
        _one_step(source, cfg, source_opt)  # AdamW state to carry over
        saver = checkpoint.Checkpointer(run_dir, cfg, source, source_opt, scaler, info)
        saver.save(train.TrainState(step=1, tokens=128))
        saver.wait()  # written in the background (--ckpt_async)
        resumed = cfg.replace(fp8=not saved_fp8)
        train.check_run_dir(run_dir, settle(resumed, Machine("cpu")), Machine("cpu"))  # accepts the change
        state = train.TrainState()
        loader = checkpoint.Checkpointer(run_dir, resumed, target, target_opt, target_scaler, info)
        assert loader.resume(state)
        assert state.step == 1
        for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        for a, b in zip(source_opt.state.values(), target_opt.state.values(), strict=True):
            assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        _one_step(target, cfg, target_opt)  # and it trains on
