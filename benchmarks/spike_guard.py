"""The spike guard's two measurements on this machine, each a table (the closing figures of issue 38):

  healthy: the z-scores healthy runs reach, across learning rates, batch sizes, float32 and float16, one
           rank and two, and a larger model: the margin the default --spike_zscore keeps. Each run trains
           with the guard watching but never skipping (--spike_zscore 1e9, which changes nothing: a run
           it does not skip is bitwise the unguarded one) and logs every step; its (loss, grad norm)
           series is replayed through gpt2repro.guard.SpikeGuard for each z-score apart.
  poison:  real faults: stretches of random-token batches written into a copy of the shards at the
           batches some steps read (the data order is a pure function of seed and step), placed where
           the guard is weakest; every run with the defaults (no guard flag), against the clean run's
           final val loss.

    python benchmarks/spike_guard.py healthy --out /tmp/guard
    python benchmarks/spike_guard.py poison --out /tmp/guard

The data is tiny Shakespeare from examples/ (prepared into OUT/data) unless --data names prepared shards.
Runs go two at a time (--jobs), one thread each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpt2repro import rundir, shards  # noqa: E402
from gpt2repro.config import TrainConfig  # noqa: E402
from gpt2repro.data import BatchSpec, ShardLoader  # noqa: E402
from gpt2repro.guard import MIN_HISTORY, SpikeGuard  # noqa: E402

# The setting: shakespeare-cpu cut to 300 steps, a 60-step warmup, a checkpoint every 50.
BASE = [
    "--config",
    "shakespeare-cpu",
    "--max_steps",
    "300",
    "--warmup_steps",
    "60",
    "--ckpt_interval",
    "50",
    "--eval_interval",
    "300",
    "--log_interval",
    "10",
]
WATCH = ["--spike_zscore", "1e9", "--log_interval", "1"]  # the guard computes z-scores and never skips

HEALTHY = {
    "shakespeare-cpu as it is (1300 steps)": [
        "--max_steps",
        "1300",
        "--eval_interval",
        "1300",
        "--ckpt_interval",
        "500",
    ],
    "lr 8e-3, batch 8, fp32": [],
    "lr 4e-3": ["--lr", "4e-3"],
    "lr 1.6e-2": ["--lr", "1.6e-2"],
    "lr 3.2e-2": ["--lr", "3.2e-2"],
    "batch 2": ["--batch_size", "2"],
    "batch 32": ["--batch_size", "32"],
    "float16 (GradScaler)": ["--dtype", "float16"],
    "2 ranks x batch 4": ["--batch_size", "4", "--nproc", "2"],
    "2 ranks, float16, lr 1.6e-2": ["--batch_size", "4", "--dtype", "float16", "--lr", "1.6e-2", "--nproc", "2"],
    "6 layers x 192, block 128 (10.7M)": ["--n_layer", "6", "--n_head", "6", "--n_embd", "192", "--block_size", "128"],
    "warmup 10, lr 8e-3": ["--warmup_steps", "10"],
}

NEWLINE = 198  # one repeated token whose loss is low: learned without a spike, it damages the weights
POISONS = {  # name: (poisoned batches, extra flags, one rank's rows only, the token (None: random ones))
    "none": (range(0), [], False, None),
    "200-229, guard off": (range(200, 230), ["--spike_zscore", "0"], False, None),
    "200-229": (range(200, 230), [], False, None),
    "61-90 (right after the warmup)": (range(61, 91), [], False, None),
    "136-165 (inside the first window)": (range(136, 166), [], False, None),
    "200-259 (longer than rollback_after)": (range(200, 260), [], False, None),
    "200-240, a checkpoint every 10": (range(200, 241), ["--ckpt_interval", "10"], False, None),
    "200-229, float16": (range(200, 230), ["--dtype", "float16"], False, None),
    "200-229, 2 ranks, rank 0's rows only": (range(200, 230), ["--batch_size", "4", "--nproc", "2"], True, None),
    "200-259, kill -9 after the rollback": (range(200, 260), [], False, None),
    "200-229 newlines, a checkpoint every 10": (range(200, 230), ["--ckpt_interval", "10"], False, NEWLINE),
}


def poison(
    data: Path,
    out: Path,
    batches,
    batch_size=8,
    block_size=64,
    seed=1337,
    world_size=1,
    ranks=None,
    token=None,
    vocab_size=50257,
) -> Path:
    """A copy of the shards in `data` whose windows read by optimizer steps `batches` (of a run with this global
    layout: batch_size per rank, world_size ranks, one micro-batch) hold random tokens, or `token` repeated;
    only the rows of `ranks` when given. The first and last token of each window, which its neighbours share,
    are kept."""
    shutil.copytree(data, out)
    spec = BatchSpec(batch_size, 1, world_size, 0)
    loader = ShardLoader(str(out), block_size, vocab_size, spec, seed, "cpu")
    tokens = [np.array(shards.open_tokens(s)) for s in loader.shards]
    rng = np.random.default_rng(0)
    for step in batches:
        for rank in range(world_size) if ranks is None else ranks:
            first = (step - 1) * spec.global_windows + rank * batch_size
            for g in range(first, first + batch_size):
                epoch, i = divmod(g, loader.num_windows)
                shard_ids, window_ids = loader._epoch_order(epoch)
                start = int(window_ids[i]) * block_size
                fill = rng.integers(0, vocab_size, block_size - 1) if token is None else token
                tokens[shard_ids[i]][start + 1 : start + block_size] = fill
    for shard, t in zip(loader.shards, tokens, strict=True):
        shards.write_shard(shard.path, t)
    return out


def train_command(data: Path, out: Path, flags: list[str]) -> list[str]:
    flags = list(flags)
    nproc = 1
    if "--nproc" in flags:
        i = flags.index("--nproc")
        nproc = int(flags[i + 1])
        del flags[i : i + 2]
    launch = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    return [*launch, str(REPO / "launch" / "train.py"), "--data", str(data), "--out", str(out), *BASE, *flags]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def train(data: Path, out: Path, flags: list[str], kill_after_rollback: bool = False) -> float:
    """Run to the end (or, with kill_after_rollback, kill -9 after the first rollback, then rerun it to the end);
    its output in out.log. Its wall time in seconds."""
    began = time.time()
    cmd = train_command(data, out, flags)
    with open(f"{out}.log", "w") as log:
        if kill_after_rollback:
            proc = subprocess.Popen(cmd, env=environment(), stdout=log, stderr=subprocess.STDOUT)
            metrics = out / "metrics.jsonl"
            while proc.poll() is None and not (metrics.exists() and "rollback_from" in metrics.read_text()):
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            print(f"  killed -9 at step {records(out)[-1]['step']}", file=log, flush=True)
        code = subprocess.run(cmd, env=environment(), stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}; see {out}.log")
    return time.time() - began


def records(run_dir: Path) -> list[dict]:
    return rundir.read_metrics(run_dir)


def final_val(run_dir: Path) -> float:
    return [r["val_loss"] for r in records(run_dir) if "val_loss" in r][-1]


def replay_z(run_dir: Path, warmup: int, window: int = 128) -> tuple[tuple[float, int], tuple[float, int]]:
    """The largest z-score of the loss and of the grad norm over the steps the guard judged, each with its step:
    the logged (loss, grad norm) of every step replayed through SpikeGuard."""
    guard = SpikeGuard(float("inf"), window, "cpu", warmup)
    best = [(0.0, 0), (0.0, 0)]
    for r in records(run_dir):
        if "grad_norm" not in r or "rollback_from" in r:
            continue
        x = torch.tensor([r["loss"], r["grad_norm"]])
        level, noise = guard.baseline()
        if r["step"] > warmup and int(guard.count) >= MIN_HISTORY:
            z = ((x - level) / noise).tolist()
            best = [max(b, (zi, r["step"])) for b, zi in zip(best, z, strict=True)]
        guard.check(r["step"], x[0], x[1])
    return best[0], best[1]


def healthy(data: Path, out: Path, jobs: int) -> None:
    def one(item):
        name, flags = item
        run_dir = out / "healthy" / name.split(" (")[0].replace(" ", "_").replace(",", "")
        seconds = train(data, run_dir, [*flags, *WATCH])
        warmup = int(flags[flags.index("--warmup_steps") + 1]) if "--warmup_steps" in flags else 60
        return name, replay_z(run_dir, warmup), final_val(run_dir), records(run_dir)[-1]["step"], seconds

    (out / "healthy").mkdir(parents=True, exist_ok=True)
    print(
        f"{'healthy run (shakespeare-cpu, 300 steps, warmup 60)':54} {'steps':>5} {'loss z (step)':>15} "
        f"{'grad z (step)':>15} {'val':>7} {'time':>6}"
    )
    largest = [0.0, 0.0]
    with ThreadPoolExecutor(jobs) as pool:
        for name, ((zl, sl), (zg, sg)), val, steps, seconds in pool.map(one, HEALTHY.items()):
            largest = [max(largest[0], zl), max(largest[1], zg)]
            print(
                f"{name:54} {steps:5d} {zl:8.2f} ({sl:4d}) {zg:8.2f} ({sg:4d}) {val:7.4f} {seconds:5.0f}s", flush=True
            )
    threshold = TrainConfig().spike_zscore
    print(
        f"largest healthy z-score of the loss {largest[0]:.2f}: the default --spike_zscore {threshold:g} is "
        f"{threshold / largest[0]:.2f}x that; of the grad norm {largest[1]:.2f} (not judged by default)"
    )


def poisoned(data: Path, out: Path, jobs: int, only: str = "") -> None:
    def one(item):
        name, (batches, flags, one_rank, token) = item
        slug = name.split(" (")[0].replace(" ", "_").replace(",", "").replace("'", "")
        two = "--nproc" in flags
        copy = poison(
            data,
            out / "poison" / f"{slug}.data",
            batches,
            batch_size=4 if two else 8,
            world_size=2 if two else 1,
            ranks=[0] if one_rank else None,
            token=token,
        )
        run_dir = out / "poison" / slug
        seconds = train(copy, run_dir, flags, kill_after_rollback="kill" in name)
        shutil.rmtree(copy)
        rs = records(run_dir)
        spikes = max((r.get("spikes", 0) for r in rs), default=0)
        back = [f"{r['rollback_from']}->{r['step']}" for r in rs if "rollback_from" in r]
        return name, final_val(run_dir), spikes, back, seconds

    (out / "poison").mkdir(parents=True, exist_ok=True)
    rows = [item for item in POISONS.items() if not only or item[0] == "none" or only in item[0]]
    results = list(ThreadPoolExecutor(jobs).map(one, rows))
    clean = results[0][1]
    print(
        f"{'poison (random tokens), defaults unless named':42} {'final val':>9} {'vs clean':>8} {'spikes':>6}  "
        "rollbacks"
    )
    for name, val, spikes, back, seconds in results:
        print(
            f"{name:42} {val:9.4f} {100 * (val - clean) / clean:+7.2f}% {spikes:6d}  {', '.join(back) or '-'}"
            f"  ({seconds:.0f}s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["healthy", "poison"])
    parser.add_argument("--out", type=Path, required=True, help="a directory for the data and the runs")
    parser.add_argument("--data", type=Path, help="prepared shards (default: tiny Shakespeare from examples/)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--only", default="", help="poison: only the rows whose name holds this (and the clean one)")
    args = parser.parse_args()
    data = args.data
    if data is None:
        data = args.out / "data"
        if not data.exists():
            prepare = [
                sys.executable,
                str(REPO / "data_prep" / "prepare.py"),
                "--out",
                str(data),
                "--files",
                str(REPO / "examples" / "tinyshakespeare.txt"),
            ]
            subprocess.run(prepare, check=True, capture_output=True)
    if args.table == "healthy":
        healthy(data, args.out, args.jobs)
    else:
        poisoned(data, args.out, args.jobs, args.only)


if __name__ == "__main__":
    main()
