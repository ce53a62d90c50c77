"""What per-step fault tolerance (--ft_groups, gpt2repro/ft.py) costs on a healthy run, and what a lost group costs.

    python benchmarks/ft_cost.py                        # tiny Shakespeare, a small model, 2 x 1 rank, on the CPU
    python benchmarks/ft_cost.py --steps 200 --train_args "--n_embd 256"

Three runs of the same training (the same global batch, the same losses), each a fresh set of processes:

    ddp        one torchrun job of 2 ranks: no fault tolerance
    ft         a torchft lighthouse and 2 replica groups of 1 rank: the quorum before each step, the all-reduce
               across groups, should_commit
    ft, kill   the same, with group 1 killed (-9) as it begins step --kill_at and started again once group 0 has
               gone on alone for 10 steps: it heals from group 0

Printed: the median step time of each healthy run (metrics.jsonl's tokens/s, past the first log steps) and the
overhead of fault tolerance, per step and as a share; for the kill, the survivor's failed step, its next quorum
(the lighthouse's heartbeat timeout: the lost group is no longer counted), their sum (from the kill to its next
committed step, less one step), and the restarted group's start-up and heal.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def median_step_s(run_dir: Path, skip: int) -> float:
    steps = [r for r in records(run_dir) if r.get("tokens_per_s") and r["step"] > skip]
    tokens = [r for r in records(run_dir) if "tokens" in r and "loss" in r]
    per_step = tokens[1]["tokens"] - tokens[0]["tokens"]
    return statistics.median(per_step / r["tokens_per_s"] for r in steps)


def train_args(args, out: Path) -> list[str]:
    return ["--data", args.data, "--out", str(out), "--config", "shakespeare-cpu", "--max_steps", str(args.steps),
            "--log_interval", "1", "--eval_interval", "1000000", "--ckpt_interval", "1000000", "--device", "cpu",
            *shlex.split(args.train_args)]  # fmt: skip


def environ() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def group(args, out: Path, g: int, port: int) -> subprocess.Popen:
    ft = ["--ft_groups", "2", "--ft_group", str(g), "--ft_lighthouse", f"localhost:{port}"]
    cmd = [sys.executable, TRAIN, *train_args(args, out), *ft]
    return subprocess.Popen(cmd, env=environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lighthouse(port: int) -> subprocess.Popen:
    cmd = ["torchft_lighthouse", "--min_replicas", "1", "--bind", f"[::]:{port}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ddp_run(args, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN]
    subprocess.run([*cmd, *train_args(args, out)], env=environ(), check=True, capture_output=True)


def ft_run(args, out: Path, kill: bool) -> float | None:
    """The two groups to the end; kill: group 1 killed at --kill_at and restarted. The kill's time."""
    port = free_port()
    house = lighthouse(port)
    killed_at = None
    try:
        groups = [group(args, out, g, port) for g in (0, 1)]
        if kill:
            while max((r["step"] for r in records(out / "group_1") if "loss" in r), default=0) < args.kill_at - 1:
                time.sleep(0.01)
            groups[1].send_signal(signal.SIGKILL)
            killed_at = time.time()
            groups[1].wait()
            at = max(r["step"] for r in records(out / "group_0") if "loss" in r)
            while max(r["step"] for r in records(out / "group_0") if "loss" in r) < at + 10:
                time.sleep(0.01)
            groups[1] = group(args, out, 1, port)
        for proc in groups:
            if proc.wait() != 0:
                raise SystemExit(f"a group exited {proc.returncode}: rerun with --train_args to see it")
    finally:
        house.kill()
    return killed_at


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prepared shards (default: tiny Shakespeare from examples/, prepared here)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--kill_at", type=int, default=30)
    p.add_argument("--train_args", default="--n_embd 128 --block_size 128", help="more flags for every run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data = str(Path(tmp) / "data")
            prepare = [sys.executable, str(REPO / "data_prep" / "prepare.py"), "--out", args.data]
            subprocess.run(
                [*prepare, "--files", str(REPO / "examples" / "tinyshakespeare.txt")], check=True, capture_output=True
            )
        ddp_run(args, Path(tmp) / "ddp")
        ft_run(args, Path(tmp) / "ft", kill=False)
        ft_run(args, Path(tmp) / "kill", kill=True)
        skip = 10  # compilation, warm-up
        base, ft = median_step_s(Path(tmp) / "ddp", skip), median_step_s(Path(tmp) / "ft" / "group_0", skip)
        survivor, healed = records(Path(tmp) / "kill" / "group_0"), records(Path(tmp) / "kill" / "group_1")
    print(f"shakespeare-cpu {args.train_args}, {args.steps} steps, 2 ranks / 2 groups of 1 rank, CPU, OMP 1 thread")
    print(f"{'run':<10} {'step ms':>9}")
    print(f"{'ddp':<10} {1e3 * base:>9.1f}")
    print(f"{'ft':<10} {1e3 * ft:>9.1f}")
    print(f"fault tolerance on a healthy run: {1e3 * (ft - base):+.1f} ms per step = {100 * (ft / base - 1):+.1f}%")
    failed = [r["ft_step_failed_s"] for r in survivor if "ft_step_failed_s" in r]
    shrunk = [r["ft_quorum_s"] for r in survivor if r.get("ft_groups_live") == 1]
    heal = [r for r in healed if r.get("ft_healed_from_step") is not None][-1]
    startups = [r["startup_s"] for r in healed if "startup_s" in r]
    print(
        f"kill at step {args.kill_at}: the survivor's failed step {sum(failed):.2f}s + its quorum without the lost "
        f"group {sum(shrunk):.2f}s = {sum(failed) + sum(shrunk):.2f}s from the kill to its next step"
    )
    print(
        f"the restarted group: start-up {startups[-1]:.1f}s to its first step, of which the quorum and heal "
        f"(to step {heal['step']}) {heal['ft_quorum_s']:.2f}s"
    )


if __name__ == "__main__":
    main()
