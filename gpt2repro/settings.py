"""The run as it really runs: every "auto" of a TrainConfig settled once, for one machine.

`settle(asked, machine, given)` is the one function that turns what was asked (a preset or a config
file, plus the flags typed in `given`) and the machine (device kind and capability, world size,
ranks per node, GPU memory) into the settings that run: the batch split, dtype, compile, fused
loss, strategy, the Muon lr, the wsd decay, the GPU memory the planner counts and the MFU peak.
Training, evaluation, the dry run and the benchmark take their settings from here; nothing else
decides an "auto". A run's config.json holds the settled config (config.to_json), and the asked
values that differ under "requested"; settling a settled config again changes nothing, so that
config.json works as --config and resumes as the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2repro import config as C
from gpt2repro import memory, parallel
from gpt2repro.loss import fused_loss_pays
from gpt2repro.metrics import peak_tflops_of
from gpt2repro.precision import gpu_computes_bfloat16, resolve_dtype


@dataclass(frozen=True)
class Machine:
    """What the settings depend on. Built for this process (`this`), or for GPUs planned for elsewhere
    (`planned`, the dry run)."""

    device_type: str  # cpu | cuda
    world_size: int = 1
    ranks_per_node: int = 0  # 0: all on one node
    gpu_memory_bytes: float = 0.0  # per GPU; 0: none (a CPU)
    gpu_name: str = ""  # for the peak FLOP/s table
    gpu_bfloat16: bool = True  # bfloat16 tensor cores (compute capability 8.0+); a planned GPU is taken to have them

    @classmethod
    def this(cls, device: str, world_size: int, ranks_per_node: int) -> Machine:
        """This process's device (as distributed.init picked it) and launch."""
        if torch.device(device).type != "cuda":
            return cls("cpu", world_size, ranks_per_node)
        props = torch.cuda.get_device_properties(device)
        return cls("cuda", world_size, ranks_per_node, float(props.total_memory), props.name, gpu_computes_bfloat16())

    @classmethod
    def planned(cls, world_size: int, ranks_per_node: int, gpu_memory_gb: float, here: Machine) -> Machine:
        """world_size GPUs of gpu_memory_gb (0: this machine's) in nodes of ranks_per_node: planned from here."""
        gpu_bytes = gpu_memory_gb * memory.GiB or here.gpu_memory_bytes
        if not gpu_bytes:
            return cls("cpu", world_size, ranks_per_node)
        return cls("cuda", world_size, ranks_per_node, gpu_bytes, here.gpu_name, here.gpu_bfloat16)


def settle(asked: C.TrainConfig, machine: Machine, given: frozenset[str] = frozenset()) -> C.TrainConfig:
    """The settings that run: asked's batch split for this world size (C.resolve, which also validates)
    and every auto decided for this machine. A ValueError lists every problem."""
    cfg = C.resolve(asked, machine.world_size, given)
    device_type = machine.device_type
    dtype = resolve_dtype(cfg.dtype, device_type, gpu_bfloat16=machine.gpu_bfloat16)
    cfg = cfg.replace(
        device=device_type,
        dtype=dtype,
        compile=_switch(cfg.compile, device_type == "cuda"),
        fused_loss=_switch(cfg.fused_loss, fused_loss_pays(device_type)),
        gpu_memory_gb=cfg.gpu_memory_gb or machine.gpu_memory_bytes / memory.GiB,
        peak_tflops=cfg.peak_tflops or peak_tflops_of(machine.gpu_name, dtype),
    )
    if cfg.optimizer == "muon" and not cfg.muon_lr:
        # Twice AdamW's: the best ratio benchmarks/optimizer_steps.py found on its CPU reference (README, Muon).
        cfg = cfg.replace(muon_lr=2 * cfg.lr)
    if cfg.lr_schedule == "wsd" and not cfg.decay_steps:
        cfg = cfg.replace(decay_steps=max(1, cfg.max_steps // 5))  # the last 20%
    if cfg.strategy == "auto":
        cfg = cfg.replace(strategy=plan(cfg, machine).strategy)
    if cfg.eval_tasks and cfg.strategy in ("fsdp", "hsdp"):
        raise ValueError(
            f"--eval_tasks needs every rank to hold the whole model, which strategy {cfg.strategy} does not; "
            "evaluate the run's checkpoints instead (launch/eval.py --ckpt RUN --tasks ...)."
        )
    return cfg


def _switch(setting: str, auto: bool) -> str:
    return setting if setting != "auto" else ("true" if auto else "false")


def plan(cfg: C.TrainConfig, machine: Machine) -> memory.MemoryPlan:
    """The memory plan of a settled cfg on machine (strategy auto: the one the planner picks)."""
    return parallel.plan(
        cfg,
        C.model_config(cfg),
        machine.world_size,
        cfg.gpu_memory_gb * memory.GiB,
        machine.device_type,
        machine.ranks_per_node,
    )


def requested(asked: C.TrainConfig, settled: C.TrainConfig) -> dict:
    """The asked values that settling changed (the autos, a bent batch), as a config file holds them."""
    before, after = C.to_json(asked), C.to_json(settled)
    return {name: value for name, value in before.items() if after[name] != value}


def dry_run(asked: C.TrainConfig, given: frozenset[str], machine: Machine) -> str:
    """The batch and memory plan of asked on machine; nothing is allocated."""
    cfg = settle(asked, machine, given)
    strategy = f"strategy {asked.strategy}" + (f" -> {cfg.strategy}" if asked.strategy == "auto" else "")
    batch = C.describe_batch(asked, cfg, machine.world_size, given)
    return (
        f"dry run: {strategy} on {machine.world_size} rank(s), nothing trained\n{batch}\n"
        f"{memory.format_plan(plan(cfg, machine), machine.gpu_memory_bytes)}"
    )
