"""What a restart costs in start-up, with the compile cache kept in the run directory and without it.

    python benchmarks/restart_cost.py                           # tiny Shakespeare, shakespeare-cpu, compiled
    python benchmarks/restart_cost.py --data data/owt --config gpt2-124m --device cuda     # on a GPU

Three launches of launch/train.py with --compile true, each a fresh process as a requeued job's is:

    cold      a new run: it compiles (RUN_DIR/compile_cache is made)
    resumed   the same command again, with --max_steps raised: it resumes from the checkpoint and loads the
              compiled graphs and kernels from RUN_DIR/compile_cache
    no cache  the same resume with RUN_DIR/compile_cache deleted first: what every requeue paid before the cache
              was kept (and what a requeue on a fresh node pays when the cache lives in /tmp)

Printed: each launch's start-up record from metrics.jsonl (from the process's start to the end of its first
step) in its parts, and the resumed first step as a share of the cold one and of the uncached resume's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gpt2repro.metrics import STARTUP_PARTS

REPO = Path(__file__).resolve().parents[1]


def launch(args, data: str, out: Path, max_steps: int) -> dict:
    """One launch; its start-up record."""
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", args.config, "--data", data]
    cmd += ["--out", str(out), "--compile", "true", "--max_steps", str(max_steps), "--device", args.device]
    cmd += ["--ckpt_interval", str(args.steps), "--eval_interval", "1000000", "--log_interval", "1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "startup_s" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prepared shards (default: tiny Shakespeare from examples/, prepared here)")
    p.add_argument("--config", default="shakespeare-cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="steps per launch")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "data")
            prepare = [sys.executable, str(REPO / "data_prep" / "prepare.py"), "--out", data]
            subprocess.run(
                [*prepare, "--files", str(REPO / "examples" / "tinyshakespeare.txt")], check=True, capture_output=True
            )
        out = Path(tmp) / "run"
        rows = {"cold": launch(args, data, out, args.steps), "resumed": launch(args, data, out, 2 * args.steps)}
        shutil.rmtree(out / "compile_cache")
        rows["no cache"] = launch(args, data, out, 3 * args.steps)
    print(f"{args.config} on {args.device}, --compile true; start-up per launch, seconds (metrics.jsonl's record):")
    names = [part.replace("_", " ") for part in STARTUP_PARTS]
    print(f"{'launch':<9} {'total':>7} " + " ".join(f"{n:>11}" for n in names))
    for name, r in rows.items():
        parts = " ".join(f"{r.get(f'startup_{part}_s', 0.0):>11.2f}" for part in STARTUP_PARTS)
        print(f"{name:<9} {r['startup_s']:>7.2f} {parts}")
    first = {name: r["startup_first_step_s"] for name, r in rows.items()}
    print(
        f"resumed first step = {100 * first['resumed'] / first['cold']:.0f}% of the cold one, "
        f"{100 * first['resumed'] / first['no cache']:.0f}% of a resume without the cache"
    )


if __name__ == "__main__":
    main()
