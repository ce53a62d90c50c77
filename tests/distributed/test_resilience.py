"""Surviving the cluster with real processes: signals, killed workers, hung ranks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.helpers import REPO, TINY, TRAIN, env, free_port, losses, metrics, run, train_cmd

LONG = ["--max_steps", 12, "--ckpt_interval", 4]


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


@pytest.fixture(scope="module")
def two_rank_reference(shakespeare_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref2") / "run"
    run(train_cmd(shakespeare_data, out, *LONG, nproc=2))
    return losses(out)


def assert_close(a: dict, b: dict):
    assert a.keys() == b.keys() == set(range(1, 13))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step


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


def test_a_second_signal_exits_at_once(shakespeare_data, tmp_path):
    out = tmp_path / "twice"
    proc = subprocess.Popen(train_cmd(shakespeare_data, out, "--max_steps", 500, "--log_interval", 400), env=env(),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: (out / "config.json").exists())
    time.sleep(0.5)  # inside the training loop, far from a log step
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # two signals sent back to back would merge into one pending signal
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopping on" not in stdout and not (out / "checkpoints").exists()


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


def test_killed_worker_under_max_restarts_resumes_and_matches(two_rank_reference, shakespeare_data, tmp_path):
    out = tmp_path / "elastic"
    cmd = train_cmd(shakespeare_data, out, *LONG, nproc=2)
    cmd.insert(cmd.index(TRAIN), "--max-restarts=1")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (out / "checkpoints" / "step_00000004").exists())
    workers = children(proc.pid)  # torchrun's agent starts the workers as its children
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output
    assert_close(losses(out), two_rank_reference)


def test_two_agents_survive_one_killed_worker(two_rank_reference, shakespeare_data, tmp_path):
    out = tmp_path / "two_agents"
    port = free_port()
    args = ["--data", str(shakespeare_data), "--out", str(out), *TINY, *map(str, LONG)]
    rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=survive", "--max-restarts=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *rdzv, TRAIN, *args]
    agents = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]  # fmt: skip
    wait_for(lambda: (out / "checkpoints" / "step_00000004").exists())
    os.kill(children(agents[1].pid)[0], signal.SIGKILL)
    outputs = [a.communicate(timeout=240)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), [o[-3000:] for o in outputs]
    assert_close(losses(out), two_rank_reference)
    assert metrics(out)[-1]["step"] == 12


def test_a_hung_rank_fails_the_job_within_the_timeout():
    worker = REPO / "tests" / "distributed" / "hang_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), "5"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.time() - t0 < 60, "the job must not wait for the hung rank"
    assert "a collective did not complete within collective_timeout_s=5 s" in proc.stderr
