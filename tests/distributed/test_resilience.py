"""Surviving the cluster with real processes: preemption signals and hung ranks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.distributed.helpers import REPO, env, losses, run, train_cmd


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.02)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_checkpoints_the_current_step_and_a_rerun_finishes(shakespeare_data, tmp_path):
    args = ["--max_steps", 30, "--ckpt_interval", 1000]
    full = tmp_path / "full"
    run(train_cmd(shakespeare_data, full, *args))
    out = tmp_path / "preempted"
    proc = subprocess.Popen(train_cmd(shakespeare_data, out, *args), env=env(), stdout=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(out) >= 3)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    stopped_at = max(losses(out))
    assert stopped_at < 30 and f"stopping on SIGTERM at step {stopped_at}" in stdout
    assert (out / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").exists()
    rerun = run(train_cmd(shakespeare_data, out, *args))
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in rerun.stdout
    assert losses(out) == losses(full)  # bit for bit on one CPU rank


def test_sigusr1_to_one_rank_stops_all_ranks_together(shakespeare_data, tmp_path):
    out = tmp_path / "usr1"
    proc = subprocess.Popen(train_cmd(shakespeare_data, out, "--max_steps", 200, nproc=2), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for(lambda: logged_steps(out) >= 3)
    workers = children(proc.pid)  # torchrun's agent starts the workers as its children
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGUSR1)  # rank 1 only
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    stopped_at = max(losses(out))
    assert stopped_at < 200 and "stopping on SIGUSR1" in output
    assert (out / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").exists()


def test_a_hung_rank_fails_the_job_within_the_timeout():
    worker = REPO / "tests" / "distributed" / "hang_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), "5"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.time() - t0 < 60, "the job must not wait for the hung rank"
    assert "a collective did not complete within collective_timeout_s=5 s" in proc.stderr
