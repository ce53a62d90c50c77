"""What a checkpoint costs training, written synchronously against in the background (--ckpt_async).

    python benchmarks/ckpt_stall.py                       # gpt2-124m with AdamW's state, 3 saves per mode
    python benchmarks/ckpt_stall.py --preset gpt2-350m --saves 2 --dir /scratch/ckpt_bench

Each mode runs in a fresh process (so that its peak host memory is its own): gpt2-124m (or --preset) built by
the trainer's engine on this machine, with AdamW's state from one real step, and the trainer's Checkpointer
saving into --dir. Training steps run on random tokens (--tokens per step: small, so that a step is short and
the save's cost stands out). Per checkpoint:

    stall       the time save() holds the training thread: the whole save (sync), or the staging copy (async);
                the first save's apart (async: it allocates the staging buffer, which later saves copy into)
    write       the time from the save's start until the checkpoint is committed (async: in the background)
    waited      the time training then waited for the background save (at the next save, a stop, the end)
    slowdown    the extra time of the steps run while the save was written (their time over the median step
                without one): on a few cores the writer and training share them
    lost        stall + waited + slowdown: the training time the checkpoint cost

Printed: a row per mode with the median of each, the staging copy's size and the process's peak resident
memory (ru_maxrss), then async's stall and lost time as a share of sync's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2repro import checkpoint, parallel, presets, settings
from gpt2repro import distributed as D
from gpt2repro.engine import build_engine, train_step
from gpt2repro.train import TrainState


class RandomTokens:
    """A loader of random token batches (the benchmark measures saves, not learning)."""

    def __init__(self, vocab_size: int, tokens: int):
        self.device, self.vocab_size, self.tokens = "cpu", vocab_size, tokens

    def batch(self, step: int, micro: int):
        g = torch.Generator().manual_seed(step * 1000 + micro)
        x = torch.randint(self.vocab_size, (1, self.tokens + 1), generator=g)
        return x[:, :-1], x[:, 1:]


def measure(preset: str, ckpt_async: bool, saves: int, tokens: int, directory: Path) -> dict:
    """One mode, in this process: `saves` checkpoints with steps between them, timed."""
    info = D.DistInfo()
    asked = presets.PRESETS[preset].replace(
        batch_size=1, grad_accum_steps=1, total_batch_tokens=0, compile="false", dtype="float32"
    )
    asked = asked.replace(ckpt_async=ckpt_async, keep_ckpts=1, max_steps=10_000, ckpt_interval=10_000)
    cfg = settings.settle(asked, settings.Machine.this("cpu", 1, 1))
    engine = build_engine(cfg, parallel.layout("ddp", info), RandomTokens(cfg.vocab_size, tokens), cfg.seed)
    saver = checkpoint.Checkpointer(directory, cfg, engine.raw_model, engine.optimizer, engine.scaler, info)
    state = TrainState()

    def step() -> float:
        t0 = time.perf_counter()
        state.step += 1
        train_step(engine, state.step)
        return time.perf_counter() - t0

    step()  # AdamW's state exists from here on
    plain = statistics.median(step() for _ in range(3))
    rows = []
    for _ in range(saves):
        t0 = time.perf_counter()
        saver.save(state)
        stall = time.perf_counter() - t0
        during = []
        while saver.pending is not None and not saver.pending.done() and len(during) < 50:
            during.append(step())
        t0 = time.perf_counter()
        written = saver.wait()
        waited = time.perf_counter() - t0
        write = written.write_s if written else stall
        slowdown = sum(max(0.0, s - plain) for s in during)
        rows.append({"stall": stall, "write": write, "waited": waited, "slowdown": slowdown, "steps": len(during)})
        step()
    saver.close()
    params = sum(p.numel() for p in engine.raw_model.parameters())
    return {
        "params": params,
        "step_s": plain,
        "staged_bytes": saver.staged_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "saves": rows,
    }


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="tokens per training step")
    p.add_argument("--dir", help="write the checkpoints here (default: a temp dir beside the system's)")
    p.add_argument("--mode", choices=("sync", "async"), help=argparse.SUPPRESS)  # one mode, in this process
    args = p.parse_args()
    if args.mode:
        result = measure(args.preset, args.mode == "async", args.saves, args.tokens, Path(args.dir))
        print(json.dumps(result))
        return
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mode in ("sync", "async"):
            cmd = [sys.executable, __file__, "--mode", mode, "--preset", args.preset, "--saves", str(args.saves)]
            cmd += ["--tokens", str(args.tokens), "--dir", str(Path(tmp) / mode)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    first = results["sync"]
    print(
        f"{args.preset}: {first['params'] / 1e6:.1f}M parameters with AdamW's state, {args.saves} saves per mode, "
        f"a training step of {args.tokens} tokens takes {first['step_s']:.2f} s"
    )
    print(
        f"{'mode':<6} {'first stall s':>13} {'stall s':>8} {'write s':>8} {'waited s':>9} {'slowdown s':>11} "
        f"{'lost s':>7} {'staged MiB':>11} {'peak RSS MiB':>13}"
    )
    lost = {}
    for mode, r in results.items():
        rows = r["saves"]
        lost[mode] = statistics.median(x["stall"] + x["waited"] + x["slowdown"] for x in rows)
        staged = r["staged_bytes"] / 2**20 if mode == "async" else 0
        peak = r["peak_rss_bytes"] / 2**20
        print(
            f"{mode:<6} {rows[0]['stall']:>13.2f} {median(rows, 'stall'):>8.2f} {median(rows, 'write'):>8.2f} "
            f"{median(rows, 'waited'):>9.2f} "
            f"{median(rows, 'slowdown'):>11.2f} {lost[mode]:>7.2f} {staged:>11,.0f} {peak:>13,.0f}"
        )
    sync_stall, async_stall = (median(results[m]["saves"], "stall") for m in ("sync", "async"))
    first_stall = results["async"]["saves"][0]["stall"]
    print(
        f"async stall = {100 * async_stall / sync_stall:.1f}% of sync's (its first save: "
        f"{100 * first_stall / sync_stall:.1f}%); "
        f"training time lost = {100 * lost['async'] / lost['sync']:.1f}% of sync's"
    )


if __name__ == "__main__":
    main()
