"""Training throughput: tokens/s, ms/step, MFU and peak memory (next to the planner's estimate).

    python benchmarks/train_throughput.py                                   # CPU reference config
    python benchmarks/train_throughput.py --preset gpt2-124m --batch_size 16 --dtype bfloat16 --compile true
    torchrun --standalone --nproc_per_node=8 benchmarks/train_throughput.py --preset gpt2-774m \
        --strategy fsdp --batch_size 8                                       # FSDP on one node

Runs the real train_step (model, fused AdamW, grad scaler, clipping; DDP or FSDP as
launch/train.py lays them out) on random tokens, after warm-up steps (and compilation),
and reports the median of --steps steps, each timed on the device. Under torchrun, tokens/s is for all ranks and
MFU and memory per GPU (the largest peak over the ranks).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import json
import os
import resource
import statistics
import time
from pathlib import Path

if __name__ == "__main__":  # before torch is imported, as launch/train.py does
    from gpt2repro.runtime import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()

import torch  # noqa: E402

from gpt2repro import distributed as D
from gpt2repro import parallel, settings
from gpt2repro.data import to_device
from gpt2repro.devices import GiB
from gpt2repro.engine import build_engine, train_step
from gpt2repro.errors import first_line
from gpt2repro.metrics import mfu
from gpt2repro.model import GPT
from gpt2repro.presets import PRESETS


class RandomTokens:
    """Stands in for ShardLoader: fresh random windows each micro-step, built on the host like the real one."""

    def __init__(self, batch_size: int, block_size: int, vocab_size: int, device: str):
        self.shape, self.vocab_size, self.device = (batch_size, block_size + 1), vocab_size, device
        self.pin = device.startswith("cuda")

    def batch(self, step: int, micro_step: int):
        rows = torch.randint(0, self.vocab_size, self.shape).numpy()
        return to_device(rows, self.device, self.pin)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--n_layer", type=int, default=None)
    p.add_argument("--n_head", type=int, default=None)
    p.add_argument("--n_embd", type=int, default=None)
    p.add_argument("--block_size", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--grad_accum_steps", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", default="auto")
    p.add_argument("--strategy", default="auto", choices=("auto", "ddp", "fsdp", "hsdp"))
    p.add_argument("--activation_checkpointing", default="false", choices=("true", "false"))
    p.add_argument("--fused_loss", default="auto", choices=("auto", "true", "false"), help="the 'ours' row's")
    p.add_argument(
        "--rows",
        default="plain,ours",
        help="any of plain,unfused,fused,ours,fp8,muon, in order; ratios are to the first",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--json", help="also write the rows to this file (rewritten as each row ends)")
    args = p.parse_args()

    with D.distributed_context("auto") as info:
        overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if info.device_type == "cpu" and not overrides:  # the CPU reference: ~16M parameters, as nanoGPT's CPU runs
            overrides = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=8)
        cfg = PRESETS[args.preset].replace(
            **overrides,
            grad_accum_steps=args.grad_accum_steps,
            total_batch_tokens=0,
            dtype=args.dtype,
            strategy=args.strategy,
            activation_checkpointing=args.activation_checkpointing == "true",
            compile=args.compile,
            peak_tflops=args.peak_tflops,
        )
        ours = cfg.replace(fused_loss=args.fused_loss)
        unfused = cfg.replace(fused_loss="false")
        # (config, return_logits): plain is nanoGPT's step, its compiled forward outputs the logits;
        # unfused is ours with the plain loss (the logits exist, inside the compiled forward only);
        # fused is ours with the fused loss; ours is the trainer's default for this device (fused_loss auto).
        rows = {
            "plain": (unfused, True),
            "unfused": (unfused, False),
            "fused": (cfg.replace(fused_loss="true"), False),
            "ours": (ours, False),
            "fp8": (ours.replace(fp8=True), False),
            "muon": (ours.replace(optimizer="muon"), False),
        }
        unknown = set(args.rows.split(",")) - set(rows)
        if unknown:
            p.error(f"unknown --rows {', '.join(sorted(unknown))}; choose from {', '.join(rows)}")
        results = []
        for name in args.rows.split(","):
            results.append(measure_or_skip(name, *rows[name], args, info))
            if info.is_main and args.json:  # after each row: a run killed (a time limit) keeps the rows it measured
                write_rows(Path(args.json), results)
        if info.is_main:
            print(report(results, info))


def write_rows(path: Path, rows: list[Row]) -> None:
    """The rows as a JSON list, replacing the file at once (os.replace): a reader never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    os.replace(partial, path)


def peak_host_bytes() -> int:
    """This process's peak resident set since the last reset_peak_host_bytes() (Linux), else since it started."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_host_bytes() -> None:
    """Hand freed heap memory back to the OS, then restart the peak-RSS count from the current RSS (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


@dataclasses.dataclass
class Row:
    name: str
    tokens_per_s: float = 0.0
    ms_per_step: float = 0.0
    mfu: float | None = None
    peak_bytes: int = 0
    planned_bytes: int = 0
    skipped: str = ""  # why the row could not run here (e.g. fp8 on a CPU)
    failed: str = ""  # what broke when it ran (a compile error, an out-of-memory error)


def measure_or_skip(name: str, cfg, return_logits: bool, args, info: D.DistInfo) -> Row:
    """The row, measured; or why it was skipped or failed, so that one row never takes the others down (on one
    rank: a row that fails on some ranks only would leave the others waiting in its collectives)."""
    try:
        return measure(name, cfg, return_logits, args, info)
    except ValueError as e:  # a configuration this machine cannot run, with the reason
        return Row(name, skipped=str(e))
    except Exception as e:
        failed = f"{type(e).__name__}: {first_line(e)}"
        print(f"{name}: failed: {failed}", flush=True)
        return Row(name, failed=failed)
    finally:
        gc.collect()  # what a failed row held (its model, its optimizer) goes before the next row
        if info.device_type == "cuda":
            torch.cuda.empty_cache()


def measure(name: str, asked, return_logits: bool, args, info: D.DistInfo) -> Row:
    """Time the train_step of asked's settings for this machine (after warm-up and compilation) and its peak
    memory, in this process."""
    machine = settings.Machine.this(info.device, info.world_size, info.local_world_size)
    cfg = settings.settle(asked, machine)  # as the trainer settles it: dtype, compile, fused loss, strategy
    plan = parallel.plan_on(cfg, machine)
    device, cuda = info.device, info.device_type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_host_bytes()

    loader = RandomTokens(cfg.batch_size, cfg.block_size, cfg.vocab_size, device)
    engine = build_engine(cfg, parallel.layout(cfg.strategy, info), loader, seed=0)
    if return_logits:
        outputs_logits(engine.raw_model)

    def run(n: int) -> list[float]:
        """Seconds of each of n steps, timed on the device (CUDA events) without syncing in between."""
        marks = [_mark(cuda)]
        for step in range(1, n + 1):
            train_step(engine, step)
            marks.append(_mark(cuda))
        if cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]
        return [b - a for a, b in itertools.pairwise(marks)]

    run(args.warmup)
    D.barrier(info)
    # The median step: a noisy neighbour on a shared machine (or one slow step) moves it least.
    seconds = statistics.median(run(args.steps))
    seconds = D.all_reduce_max(torch.tensor(seconds, device=device), info).item()
    tokens_per_s = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * info.world_size / seconds
    util = mfu(
        engine.raw_model.flops_per_token(cfg.block_size), tokens_per_s / info.world_size, cfg.peak_tflops * 1e12 or None
    )
    peak = torch.cuda.max_memory_allocated() if cuda else peak_host_bytes()
    peak = int(D.all_reduce_max(torch.tensor(float(peak), device=device), info).item())
    if info.is_main:
        print(
            f"{name}: {plan.num_params:,} params, n_layer {cfg.n_layer} n_embd {cfg.n_embd} block {cfg.block_size} "
            f"micro-batch {cfg.batch_size} x accum {cfg.grad_accum_steps} | {cfg.dtype}, {cfg.strategy}, compile "
            f"{cfg.compile}, activation checkpointing {cfg.activation_checkpointing}, "
            f"fused loss {cfg.fused_loss}",
            flush=True,
        )
    return Row(name, tokens_per_s, 1000 * seconds, util, peak, plan.total)


def outputs_logits(model: GPT) -> None:
    """nanoGPT's step, the plain row's baseline: its (compiled) forward also outputs the logits, whatever
    the training step asks for."""
    forward = model.forward
    model.forward = lambda idx, targets=None, **_: forward(idx, targets, return_logits=True)


def _mark(cuda: bool):
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def report(rows: list[Row], info: D.DistInfo) -> str:
    """One table: a row per configuration, then each row against the first (the plain step)."""
    cuda = info.device_type == "cuda"
    where = (
        f"{info.world_size} x {torch.cuda.get_device_name()}"
        if cuda
        else (f"{info.world_size} x CPU process, {torch.get_num_threads()} threads")
    )
    memory = "peak GPU memory (max_memory_allocated)" if cuda else "peak RSS (whole process)"
    lines = [
        f"{where}; tokens/s over all ranks, memory per rank: {memory}, planner's estimate beside it",
        f"{'row':<8} {'tokens/s':>12} {'ms/step':>9} {'MFU':>7} {'peak GiB':>9} {'planned':>8}",
    ]
    for r in rows:
        if r.skipped or r.failed:
            lines.append(f"{r.name:<8} skipped: {r.skipped}" if r.skipped else f"{r.name:<8} FAILED: {r.failed}")
            continue
        util = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        lines.append(
            f"{r.name:<8} {r.tokens_per_s:>12,.0f} {r.ms_per_step:>9.1f} {util:>7} "
            f"{r.peak_bytes / GiB:>9.2f} {r.planned_bytes / GiB:>8.2f}"
        )
    ran = [r for r in rows if not (r.skipped or r.failed)]
    base = ran[0] if ran else None
    for r in ran[1:]:
        lines.append(
            f"{r.name} vs {base.name}: {r.tokens_per_s / base.tokens_per_s:.2f}x tokens/s, "
            f"{r.peak_bytes / base.peak_bytes:.2f}x peak memory"
        )
    if ran and not any(r.mfu for r in ran):
        lines.append("MFU n/a: no known peak for this device; pass --peak_tflops")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
