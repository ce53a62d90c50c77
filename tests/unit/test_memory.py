"""The memory planner against what training really allocates, and the --dry_run command."""

import functools

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from benchmarks.train_throughput import RandomTokens
from gpt2repro import memory, settings
from gpt2repro.config import TrainConfig, resolve
from gpt2repro.engine import Engine, make_optimizer, make_scaler, train_step
from gpt2repro.model import GPT, GPTConfig
from gpt2repro.parallel import PTDTYPE
from gpt2repro.presets import PRESETS

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
# GPT-2's vocabulary (the logits are most of the memory, as in real runs) and six real blocks.
SMALL = TrainConfig(n_layer=6, n_head=4, n_embd=256, block_size=256, batch_size=2, warmup_steps=1, max_steps=10)
# bfloat16 matmuls are slow on this CPU: a small vocabulary, so the blocks and autocast copies dominate.
SMALL_BF16 = SMALL.replace(vocab_size=512, n_layer=4, n_embd=128)


@functools.cache  # each configuration is measured once for the tests below
def measured_peak(cfg: TrainConfig, dtype: str) -> int:
    """Peak bytes of live tensors over a real train_step (the second, when AdamW state exists)."""
    cfg = settings.settle(cfg.replace(dtype=dtype), settings.Machine("cpu"))  # fused_loss auto: as on a CPU
    torch.manual_seed(0)
    model = GPT(cfg.model_config())
    model.activation_checkpointing = cfg.activation_checkpointing
    model.fused_loss = cfg.fused_loss == "true"
    optimizer, scaler = make_optimizer(model, cfg), make_scaler(dtype, "cpu")
    loader = RandomTokens(cfg.batch_size, cfg.block_size, cfg.vocab_size, "cpu")
    autocast = torch.autocast("cpu", dtype=PTDTYPE[dtype], enabled=dtype != "float32")
    tracker = MemTracker()  # torch's own accounting of every tensor's storage, by device
    tracker.track_external(model, optimizer)
    with tracker:
        for step in range(2):
            train_step(Engine(cfg, model, model, optimizer, scaler, loader, autocast), step + 1)
            if step == 0:
                tracker.reset_mod_stats()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("fused_loss", ["true", "false"])
@pytest.mark.parametrize(
    ("base", "dtype", "checkpointing"),
    [
        (SMALL, "float32", False),
        (SMALL, "float32", True),
        (SMALL_BF16, "bfloat16", False),
        (SMALL_BF16, "bfloat16", True),
    ],
)
def test_estimate_within_20_percent_of_measured(base, dtype, checkpointing, fused_loss):
    cfg = resolve(base.replace(activation_checkpointing=checkpointing, fused_loss=fused_loss), 1)
    measured = measured_peak(cfg, dtype)
    plan = memory.estimate(
        cfg.model_config(),
        batch_size=cfg.batch_size,
        world_size=1,
        dtype=dtype,
        strategy="ddp",
        activation_checkpointing=checkpointing,
        fused_loss=fused_loss == "true",
        device_type="cpu",
    )
    assert abs(plan.total - measured) <= 0.2 * measured, (plan, measured)


def test_fused_loss_saves_what_the_planner_says():
    cfg = resolve(SMALL.replace(batch_size=8), 1)  # 2048 tokens: two chunks
    plain = measured_peak(cfg.replace(fused_loss="false"), "float32")
    fused = measured_peak(cfg.replace(fused_loss="true"), "float32")

    def planned(fused_loss):
        return memory.estimate(
            cfg.model_config(),
            batch_size=cfg.batch_size,
            world_size=1,
            dtype="float32",
            strategy="ddp",
            fused_loss=fused_loss,
        ).total

    saved, predicted = plain - fused, planned(False) - planned(True)
    assert saved > 0.3 * plain and saved == pytest.approx(predicted, rel=0.2)


def test_activation_checkpointing_saves_what_the_planner_says():
    cfg = resolve(SMALL.replace(fused_loss="false"), 1)
    plain = measured_peak(cfg, "float32")
    ckpt = measured_peak(cfg.replace(activation_checkpointing=True), "float32")

    def planned(checkpointing):
        return memory.estimate(
            cfg.model_config(),
            batch_size=cfg.batch_size,
            world_size=1,
            dtype="float32",
            strategy="ddp",
            activation_checkpointing=checkpointing,
            fused_loss=False,
        ).total

    saved, predicted = plain - ckpt, planned(False) - planned(True)
    assert predicted > 40e6 and saved == pytest.approx(predicted, rel=0.2)


@pytest.mark.parametrize("preset", ["gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m"])
def test_planner_counts_the_parameters_of_the_model(preset):
    config = PRESETS[preset].model_config()
    with torch.device("meta"):  # shapes only: no memory for 1.5B parameters
        model = GPT(config)
    plan = memory.estimate(config, batch_size=1, world_size=8, dtype="bfloat16", strategy="fsdp")
    assert plan.num_params == model.num_params()
    assert plan.optimizer == 8 * plan.num_params // 8  # AdamW's two fp32 moments, sharded over 8 ranks


def test_dry_run_prints_the_plan_and_auto_picks_fsdp_when_ddp_does_not_fit():
    def dry_run(preset: str, world_size: int, gpu_memory_gb: float, per_node: int = 0, **typed) -> str:
        machine = settings.Machine.planned(world_size, per_node or world_size, gpu_memory_gb, settings.Machine("cpu"))
        return settings.dry_run(PRESETS[preset].replace(**typed), frozenset(typed), machine)

    fits = dry_run("gpt2-774m", 8, 80)
    assert "strategy auto -> ddp" in fits and "fits in 80.0 GiB" in fits
    assert "774,090,240 parameters" in fits and "optimizer" in fits and "activations" in fits

    tight = dry_run("gpt2-1558m", 8, 24)
    assert "strategy auto -> fsdp" in tight and "fits in 24.0 GiB" in tight

    forced = dry_run("gpt2-1558m", 8, 24, strategy="ddp")
    assert "does NOT fit in 24.0 GiB" in forced and "--strategy fsdp" in forced

    # Two nodes of 8: sharding within a node fits, so the all-gathers stay inside the nodes.
    nodes = dry_run("gpt2-1558m", 16, 24, per_node=8)
    assert "strategy auto -> hsdp" in nodes and "fits in 24.0 GiB" in nodes


def test_hsdp_holds_per_gpu_what_fsdp_on_one_node_holds():
    config = resolve(PRESETS["gpt2-1558m"], 16).model_config()
    common = dict(batch_size=2, dtype="bfloat16", grad_accum_steps=2, fused_loss=False, compiled=True)
    hsdp = memory.estimate(config, world_size=16, ranks_per_node=8, strategy="hsdp", **common)
    fsdp_node = memory.estimate(config, world_size=8, strategy="fsdp", **common)
    fsdp_all = memory.estimate(config, world_size=16, strategy="fsdp", **common)
    assert hsdp.total == fsdp_node.total  # sharded over a node's 8 GPUs, replicated across nodes
    assert fsdp_all.weights < hsdp.weights and fsdp_all.optimizer < hsdp.optimizer


def test_fsdp_with_compile_counts_the_eager_loss_of_the_uncompiled_root():
    # parallel.wrap compiles only the blocks under FSDP: the root's lm_head and cross-entropy run eagerly,
    # so compile changes nothing in the loss's share (1558M, batch 8, FSDP + activation checkpointing).
    config = GPTConfig.from_preset("gpt2-1558m")
    common = dict(
        batch_size=8, world_size=1, dtype="bfloat16", strategy="fsdp", activation_checkpointing=True, fused_loss=False
    )
    compiled, eager = (
        memory.estimate(config, compiled=True, **common),
        memory.estimate(config, compiled=False, **common),
    )
    assert compiled.total == eager.total
    tokens, vocab = 8 * 1024, config.padded_vocab_size
    assert eager.activations >= tokens * vocab * 12  # fp32 log-softmax, its gradient, the logits' gradient
    assert compiled.total / memory.GiB == pytest.approx(29.3, abs=0.05)  # 25.5 GiB when the compiled loss was counted
    ddp = dict(common, strategy="ddp", activation_checkpointing=False)  # DDP compiles the whole model, loss included
    assert memory.estimate(config, compiled=True, **ddp).total < memory.estimate(config, compiled=False, **ddp).total


def test_the_fused_loss_counts_its_fp32_weight_gradient_product_on_cuda():
    # On CUDA each chunk's share of the head's gradient is formed in fp32 (torch.mm out_dtype), beside the
    # fp32 sum it is added to: 4 bytes per weight entry, where the CPU's 16-bit product takes 2.
    config = GPTConfig.from_preset("gpt2-124m")
    common = dict(batch_size=16, world_size=1, dtype="bfloat16", strategy="ddp", fused_loss=True)
    cuda, cpu = (
        memory.estimate(config, device_type="cuda", **common),
        memory.estimate(config, device_type="cpu", **common),
    )
    assert cuda.total - cpu.total == 2 * config.padded_vocab_size * config.n_embd
