"""--tune true: before the money is spent, measure a few real steps of each layout that may fit this
launch, pick the fastest that fits, and forecast the run's time, cost and time to GPT-2's loss.

    python launch/train.py --config shakespeare-cpu --data data/shakespeare --out runs/s --tune true
    torchrun --nproc_per_node=8 launch/train.py --config gpt2-124m --data data/owt --out runs/124m \\
        --tune true --gpu_hour_cost 2.50 --tune_out tuned.json

The launch is the real one: the same command, ranks, GPUs and data as the run. For each candidate
layout (`candidates`: the micro-batch, with accumulation keeping the global batch; activation
checkpointing; the fused loss; each strategy that applies) the run is built as configured, runs
`tune_warmup` steps (compilation, warm-up) and then `tune_steps` timed steps on the run's own batches;
the median step counts. Each trial compiles afresh (torch._dynamo.reset() first): its graph is the
static one of its own micro-batch that the real run compiles, never a recompile with a symbolic batch
after the trial before it, and its first step pays the cold compile as the run's does. The memory
planner's refusals are reported without running. An out-of-memory error marks a candidate as not
fitting on every rank (the ranks agree after each trial); one that struck a single rank inside a
collective would leave the others waiting, so each trial runs under the watchdog's slow-phase bound and
such a hang ends the tune with a line naming the trial. Each strategy's layout (hsdp's 2-D device mesh:
process groups of its own) is made once and shared by its trials and the forecast.

Nothing is written to the run directory; with --tune_out FILE the chosen layout is written there as a
config file (`--config FILE` runs it). The forecast (`Forecast`) is for this launch's hardware and world
size only: it never extrapolates to another. It adds up the measured step time over max_steps, the
start-up (the first step's cold compilation), the evaluations (a few val batches timed, scaled to
eval_tokens) and the checkpoints (the state's bytes over this file system's measured write speed), and,
with a reference curve that applies to the run (references.why_no_projection), the time until the run
reaches its target if it keeps the reference's pace.
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2repro import config as C
from gpt2repro import distributed as D
from gpt2repro import evaluate, parallel, references, settings
from gpt2repro.checkpoint import state_bytes
from gpt2repro.data import BatchSpec, EvalWindows, ShardLoader
from gpt2repro.devices import GiB
from gpt2repro.engine import build_engine, train_step
from gpt2repro.errors import first_line
from gpt2repro.forecast import Forecast, reference_and_target
from gpt2repro.metrics import mfu, synchronize

LAYOUT_FIELDS = ("batch_size", "grad_accum_steps", "activation_checkpointing", "fused_loss", "strategy")
PROBE_BYTES = 64 * 2**20  # the file that measures the checkpoint directory's write speed, and the staging copy


@dataclass(frozen=True)
class Trial:
    cfg: C.TrainConfig  # settled, with the candidate's layout
    fits: bool = True
    why: str = ""  # why it does not fit: the planner's estimate, or the out-of-memory error
    step_s: float = 0.0  # median seconds per optimizer step
    first_step_s: float = 0.0  # the first step: compilation and warm-up
    peak_bytes: int | None = None  # measured, per GPU (the largest over ranks); None on a CPU
    state_bytes: int = 0  # parameters and optimizer state, over all ranks: what a checkpoint writes
    staged_bytes: int = 0  # the most one rank holds: what its background checkpoint copies before training goes on

    @property
    def name(self) -> str:
        c = self.cfg
        act = "on" if c.activation_checkpointing else "off"
        fused = "on" if c.fused_loss == "true" else "off"
        return f"{c.strategy} micro {c.batch_size} x {c.grad_accum_steps} | act-ckpt {act} | fused {fused}"


def candidates(cfg: C.TrainConfig, machine: settings.Machine) -> list[C.TrainConfig]:
    """The layouts to try for a settled cfg, all with its global batch: every power-of-two micro-batch up
    to the rows each rank takes per step (accumulation makes up the rest), the fused loss off and on, and
    each strategy that applies here (ddp, and fsdp/hsdp from 2 ranks). Activation checkpointing is tried
    only where the same layout without it does not fit (`tune` adds those): it trades compute for memory,
    so it is faster only when it lets a bigger micro-batch fit."""
    rows = cfg.batch_size * cfg.grad_accum_steps
    micro = [b for b in (2**i for i in range(rows.bit_length())) if rows % b == 0]
    strategies = ["ddp"]
    if machine.world_size > 1:
        strategies.append("fsdp")
        if machine.world_size > machine.ranks_per_node:
            strategies.append("hsdp")
    return [
        cfg.replace(
            batch_size=b, grad_accum_steps=rows // b, strategy=s, fused_loss=fused, activation_checkpointing=False
        )
        for s in strategies
        for fused in ("false", "true")
        for b in micro  # smallest first: once one does not fit, no bigger one is tried
    ]


def run_trial(
    cfg: C.TrainConfig,
    machine: settings.Machine,
    data_dir: str,
    layout: parallel.Layout,
    steps: int,
    warmup: int,
    watchdog: D.Watchdog,
) -> Trial:
    """One candidate (on `layout`, its strategy's, made once for the tune): refused by the planner, or built
    and timed; an out-of-memory error on any rank marks it as not fitting on all of them."""
    info = layout.info
    plan, limit = parallel.plan_on(cfg, machine), cfg.gpu_memory_gb * GiB  # settled: asked, else this GPU's
    if limit and not plan.fits(limit):
        return Trial(
            cfg, fits=False, why=f"the planner estimates {plan.total / GiB:.2f} GiB > {cfg.gpu_memory_gb:g} GiB"
        )
    cuda = info.device_type == "cuda"
    failure, trial = "", None
    with watchdog.slow(f"the tune's trial of {Trial(cfg).name}"):
        try:
            trial = _timed_trial(cfg, data_dir, layout, steps, warmup, cuda)
        except torch.OutOfMemoryError as e:
            failure = f"out of memory: {first_line(e)}"
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                raise
            failure = f"out of memory: {first_line(e)}"
        finally:
            torch._dynamo.reset()  # its compiled graphs hold its model: freed before the next trial is built
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    failed = D.all_reduce_max(torch.tensor(float(bool(failure)), device=info.device), info).item() > 0
    if failed:  # on every rank together, whichever ran out
        return Trial(cfg, fits=False, why=failure or "out of memory on another rank")
    return trial


def _timed_trial(cfg, data_dir: str, layout: parallel.Layout, steps: int, warmup: int, cuda: bool) -> Trial:
    info = layout.info
    spec = BatchSpec(cfg.batch_size, cfg.grad_accum_steps, layout.dp_size, layout.dp_rank)
    loader = ShardLoader(data_dir, cfg.block_size, cfg.vocab_size, spec, cfg.seed, info.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # As in a fresh process: no graph of an earlier trial to recompile from (automatic dynamic shapes would
    # make this micro-batch's graph symbolic, unlike the run's, and its first step pay only a recompile),
    # and no recompile limit reached by the trials before.
    torch._dynamo.reset()
    engine = build_engine(cfg, layout, loader, cfg.seed)
    seconds = []
    for step in range(1, warmup + steps + 1):
        synchronize(info.device)
        t0 = time.perf_counter()
        train_step(engine, step)
        synchronize(info.device)
        seconds.append(time.perf_counter() - t0)
    step_s = D.all_reduce_max(torch.tensor(statistics.median(seconds[warmup:]), device=info.device), info).item()
    first = D.all_reduce_max(torch.tensor(seconds[0], device=info.device), info).item()
    peak = None
    if cuda:
        peak = int(D.all_reduce_max(torch.tensor(float(torch.cuda.max_memory_allocated()), device=info.device), info))
    state = state_bytes(list(engine.raw_model.parameters())) + state_bytes(list(engine.optimizer.state.values()))
    total = int(D.all_reduce_sum(torch.tensor(state, dtype=torch.float64, device=info.device), info).item())
    if layout.dp_size > 1 and cfg.strategy == "ddp":
        total //= layout.dp_size  # every replica holds the same: a checkpoint writes it once
    staged = int(D.all_reduce_max(torch.tensor(state, dtype=torch.float64, device=info.device), info).item())
    return Trial(cfg, step_s=step_s, first_step_s=first, peak_bytes=peak, state_bytes=total, staged_bytes=staged)


def tune(
    asked: C.TrainConfig, given: frozenset[str], data_dir: str, run_dir: str, info: D.DistInfo, argv: list[str]
) -> Trial | None:
    """Every candidate, timed; the table, the fastest that fits and its command line, and the forecast
    (printed by rank 0). Returns the chosen trial (None if nothing fits)."""
    machine = settings.Machine.this(info.device, info.world_size, info.local_world_size)
    cfg = settings.settle(asked, machine, given)
    trials, tried = [], candidates(cfg, machine)
    # One layout per strategy for all its trials and the forecast: hsdp's mesh makes process groups (NCCL
    # communicators and their memory) that a layout per trial would pile up.
    layouts = {s: parallel.layout(s, info) for s in dict.fromkeys(c.strategy for c in tried)}
    with D.Watchdog(cfg.collective_timeout_s, info) as watchdog:
        for candidate in tried:
            trials += _try(candidate, machine, data_dir, layouts[candidate.strategy], asked, trials, watchdog)
        fitting = [t for t in trials if t.fits]
        best = min(fitting, key=lambda t: t.step_s) if fitting else None
        forecast = measure_forecast(best, data_dir, run_dir, layouts[best.cfg.strategy], watchdog) if best else None
    if info.is_main:
        print(table(trials, info))
        if best is None:
            print("no layout fits this launch: lower --batch_size, or use more or larger GPUs.")
            return None
        changed = layout_args(best.cfg)
        print(f"fastest that fits: {best.name}\nrun it with: {command(argv, changed)}")
        print(forecast.describe())
        if cfg.tune_out:
            write_layout(cfg.tune_out, asked, best.cfg)
            print(f"wrote the chosen layout to {cfg.tune_out} (run it with --config {cfg.tune_out})")
    return best


def _try(candidate, machine, data_dir, layout, asked, trials, watchdog) -> list[Trial]:
    """A candidate's trials: none run when a smaller micro-batch of the same kind did not fit (reported as
    not fitting); a second one with activation checkpointing when it does not fit without."""
    kind = (candidate.strategy, candidate.fused_loss)
    smaller = [
        t for t in trials if (t.cfg.strategy, t.cfg.fused_loss) == kind and t.cfg.batch_size < candidate.batch_size
    ]
    if smaller and not any(t.fits for t in smaller if t.cfg.batch_size == max(s.cfg.batch_size for s in smaller)):
        return [Trial(candidate, fits=False, why="a smaller micro-batch did not fit")]
    steps, warmup = asked.tune_steps, asked.tune_warmup
    trial = run_trial(candidate, machine, data_dir, layout, steps, warmup, watchdog)
    if trial.fits:
        return [trial]
    return [
        trial,
        run_trial(candidate.replace(activation_checkpointing=True), machine, data_dir, layout, steps, warmup, watchdog),
    ]


def table(trials: list[Trial], info: D.DistInfo) -> str:
    cuda = info.device_type == "cuda"
    where = f"{info.world_size} x {torch.cuda.get_device_name()}" if cuda else f"{info.world_size} x CPU process"
    compiled = any(t.cfg.compile == "true" for t in trials)
    lines = [
        f"tune on {where}: each layout {'timed' if trials else 'none'} over real steps after warm-up (median)"
        + ("; each compiled cold, its own static graph, as its run compiles it" if compiled else "")
        + "; peak memory per GPU (max_memory_allocated; none on a CPU)",
        f"{'layout':<52} {'peak GiB':>9} {'tokens/s':>11} {'MFU':>6} {'step s':>8}",
    ]
    for t in trials:
        if not t.fits:
            lines.append(f"{t.name:<52} does not fit: {t.why}")
            continue
        tokens = t.cfg.batch_size * t.cfg.grad_accum_steps * t.cfg.block_size * info.world_size / t.step_s
        util = mfu(_flops_per_token(t.cfg), tokens / info.world_size, t.cfg.peak_tflops * 1e12 or None)
        peak = f"{t.peak_bytes / GiB:.2f}" if t.peak_bytes is not None else "-"
        util_s = f"{100 * util:.1f}%" if util is not None else "-"
        lines.append(f"{t.name:<52} {peak:>9} {tokens:>11,.0f} {util_s:>6} {t.step_s:>8.4f}")
    return "\n".join(lines)


def _flops_per_token(cfg: C.TrainConfig) -> float:
    from gpt2repro.model import GPT

    with torch.device("meta"):
        return GPT(cfg.model_config()).flops_per_token(cfg.block_size)


def layout_args(cfg: C.TrainConfig) -> list[str]:
    return [
        f"--{name} {str(getattr(cfg, name)).lower() if isinstance(getattr(cfg, name), bool) else getattr(cfg, name)}"
        for name in LAYOUT_FIELDS
    ]


def command(argv: list[str], layout: list[str]) -> str:
    """The launch's own command line, without --tune/--tune_out and with the chosen layout's fields set."""
    drop = {f"--{name}" for name in (*LAYOUT_FIELDS, "tune", "tune_out", "tune_steps", "tune_warmup")}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop:
            skip = "=" not in arg
            continue
        kept.append(arg)
    launcher = "torchrun ... " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python "
    return launcher + shlex.join([sys.argv[0], *kept]) + " " + " ".join(layout)


def write_layout(path: str, asked: C.TrainConfig, chosen: C.TrainConfig) -> None:
    """asked's fields with the chosen layout: a file --config reads (tuning itself switched off)."""
    fields = asked.replace(**{name: getattr(chosen, name) for name in LAYOUT_FIELDS}, tune=False, tune_out="")
    Path(path).write_text(json.dumps(fields.to_dict(), indent=1) + "\n")


def measure_forecast(best: Trial, data_dir: str, run_dir: str, layout: parallel.Layout, watchdog) -> Forecast:
    """The chosen layout's forecast: its measured steps, one evaluation timed on a few val batches and
    scaled to eval_tokens, and what a checkpoint stops training for: written in the background (--ckpt_async),
    the staging copy of a rank's state at this machine's copy speed; else its bytes over this file system's
    write speed."""
    cfg, info = best.cfg, layout.info
    with watchdog.slow("the tune's evaluation and write-speed measurements"):
        eval_s = _eval_seconds(cfg, data_dir, layout)
        if cfg.ckpt_async:
            seconds = torch.tensor(PROBE_BYTES / _copy_speed(info.device), dtype=torch.float64, device=info.device)
            copy_bps = PROBE_BYTES / D.all_reduce_max(seconds, info).item()  # the slowest rank's
            ckpt_s, how = best.staged_bytes / copy_bps, f"checkpoints' staging copy at {copy_bps / 2**30:,.1f} GiB/s"
        else:
            write_bps = D.broadcast_object(_write_speed(run_dir) if info.is_main else None, info)
            ckpt_s, how = (
                best.state_bytes / write_bps,
                f"checkpoints at this file system's {write_bps / 2**20:,.0f} MiB/s",
            )
    dataset = references.dataset_of(data_dir)
    curve, target = reference_and_target(cfg.reference, dataset)
    return Forecast(
        cfg,
        info.world_size,
        best.step_s,
        best.first_step_s,
        eval_s,
        ckpt_s,
        curve,
        target,
        measured=f"measured: evals on a sample of val batches, {how}",
        run_dataset=dataset,
    )


def _eval_seconds(cfg: C.TrainConfig, data_dir: str, layout: parallel.Layout) -> float:
    info = layout.info
    spec = BatchSpec(cfg.batch_size, cfg.grad_accum_steps, layout.dp_size, layout.dp_rank)
    loader = ShardLoader(data_dir, cfg.block_size, cfg.vocab_size, spec, cfg.seed, info.device)
    torch._dynamo.reset()  # as the run's evaluation compiles: none of the trials' graphs to recompile from
    engine = build_engine(cfg, layout, loader, cfg.seed)
    model = parallel.for_eval(engine.model)
    full = EvalWindows(data_dir, "val", cfg.block_size, cfg.eval_tokens, cfg.vocab_size)
    sample_tokens = min(cfg.eval_tokens, 4 * cfg.batch_size * layout.dp_size * cfg.block_size)
    sample = EvalWindows(data_dir, "val", cfg.block_size, sample_tokens, cfg.vocab_size)
    evaluate.val_loss(model, sample, cfg.batch_size, layout, engine.autocast)  # compiles for eval
    synchronize(info.device)
    t0 = time.perf_counter()
    evaluate.val_loss(model, sample, cfg.batch_size, layout, engine.autocast)
    synchronize(info.device)
    seconds = (time.perf_counter() - t0) * len(full) / len(sample)
    del engine, model
    torch._dynamo.reset()
    gc.collect()
    return D.all_reduce_max(torch.tensor(seconds, device=info.device), info).item()


def _copy_speed(device: str) -> float:
    """Bytes per second of a copy from the device into host memory, as a background checkpoint's staging makes
    it (into pinned memory from a GPU), the second of two: the first allocates, as only a run's first save does."""
    cuda = torch.device(device).type == "cuda"
    source = torch.ones(PROBE_BYTES, dtype=torch.uint8, device=device)
    target = torch.empty(PROBE_BYTES, dtype=torch.uint8, pin_memory=cuda)
    target.copy_(source)
    synchronize(device)
    t0 = time.perf_counter()
    target.copy_(source, non_blocking=cuda)
    synchronize(device)
    return PROBE_BYTES / (time.perf_counter() - t0)


def _write_speed(run_dir: str) -> float:
    """Bytes per second of one file written and fsynced beside the run directory (never inside it)."""
    where = Path(run_dir).resolve().parent
    while not where.exists():
        where = where.parent
    with tempfile.NamedTemporaryFile(dir=where, prefix=".gpt2repro-write-speed-") as f:
        data = os.urandom(PROBE_BYTES)
        t0 = time.perf_counter()
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return PROBE_BYTES / (time.perf_counter() - t0)
