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

from gpt2repro import config as C
from gpt2repro import ft, memory, parallel
from gpt2repro.batch import describe_batch
from gpt2repro.devices import Machine
from gpt2repro.schema import to_json


def settle(asked: C.TrainConfig, machine: Machine, given: frozenset[str] = frozenset()) -> C.TrainConfig:
    """The settings that run: asked's batch split for this world size (C.resolve, which also validates; under
    fault tolerance the world is every replica group's ranks: gpt2repro/ft.py)
    and every auto decided for this machine, each by the component that owns it. A ValueError lists every
    problem."""
    cfg = C.resolve(asked, machine.world_size * ft.groups(asked), given).settled(machine)
    if cfg.eval_tasks and cfg.strategy in ("fsdp", "hsdp"):
        raise ValueError(
            f"--eval_tasks needs every rank to hold the whole model, which strategy {cfg.strategy} does not; "
            "evaluate the run's checkpoints instead (launch/eval.py --ckpt RUN --tasks ...)."
        )
    return cfg


def requested(asked: C.TrainConfig, settled: C.TrainConfig) -> dict:
    """The asked values that settling changed (the autos, a bent batch), as a config file holds them."""
    before, after = to_json(asked), to_json(settled)
    return {name: value for name, value in before.items() if after[name] != value}


def dry_run(asked: C.TrainConfig, given: frozenset[str], machine: Machine) -> str:
    """The batch and memory plan of asked on machine; nothing is allocated."""
    cfg = settle(asked, machine, given)
    strategy = f"strategy {asked.strategy}" + (f" -> {cfg.strategy}" if asked.strategy == "auto" else "")
    batch = describe_batch(asked, cfg, machine.world_size * ft.groups(asked), given)
    return (
        f"dry run: {strategy} on {machine.world_size} rank(s), nothing trained\n{batch}\n"
        f"{memory.format_plan(parallel.plan_on(cfg, machine), machine.gpu_memory_bytes)}"
    )
