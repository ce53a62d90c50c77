"""Peak memory of real FSDP train steps on this rank, measured by torch's FSDPMemTracker, next
to the planner's estimate (run under torchrun by test_fsdp.py; prints one JSON line on rank 0)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker  # noqa: E402

from benchmarks.train_throughput import RandomTokens  # noqa: E402
from gpt2repro import distributed as D  # noqa: E402
from gpt2repro import memory, parallel  # noqa: E402
from gpt2repro.config import resolve  # noqa: E402
from gpt2repro.engine import Engine, make_optimizer, make_scaler, train_step  # noqa: E402
from gpt2repro.model import GPT  # noqa: E402
from tests.unit.test_memory import SMALL  # noqa: E402


def measure(checkpointing: bool, info: D.DistInfo) -> dict:
    # (Activation checkpointing's saving is measured in tests/unit/test_memory.py, in one process.)
    # GPT-2's vocabulary (the root group, gathered whole, is most of the weights) and short windows.
    cfg = resolve(SMALL.replace(n_layer=4, n_embd=128, block_size=128, activation_checkpointing=checkpointing), 2)
    torch.manual_seed(0)
    model = GPT(cfg.model_config())
    model.activation_checkpointing = checkpointing
    parallel.shard(model, "float32")
    optimizer, scaler = make_optimizer(model, cfg), make_scaler("float32", "cpu")
    loader = RandomTokens(cfg.batch_size, cfg.block_size, cfg.vocab_size, "cpu")
    tracker = FSDPMemTracker(model, optimizer)
    with tracker:
        for step in range(2):  # the second step, when AdamW's state exists
            engine = Engine(cfg, model, model, optimizer, scaler, loader, torch.autocast("cpu", enabled=False))
            train_step(engine, step + 1)
            if step == 0:
                tracker.reset_mod_stats()
    plan = memory.estimate(
        cfg.model_config(),
        batch_size=cfg.batch_size,
        world_size=2,
        dtype="float32",
        strategy="fsdp",
        activation_checkpointing=checkpointing,
    )
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return {"checkpointing": checkpointing, "measured": measured, "estimate": plan.total, "world_size": info.world_size}


with D.distributed_context("cpu") as info:
    results = [measure(False, info)]
    if info.is_main:
        print(json.dumps(results))
