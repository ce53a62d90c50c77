"""Surviving the cluster with real processes: signals, killed workers, hung ranks."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2repro import shards
from gpt2repro.data import BatchSpec, ShardLoader
from tests.distributed.helpers import (
    SLOW_STEPS,
    TINY,
    TRAIN,
    after_import,
    env,
    env_with_sitecustomize,
    free_port,
    logged_steps,
    losses,
    metrics,
    run,
    slowed,
    train_cmd,
    wait_for,
)

LONG = ["--max_steps", 12, "--ckpt_interval", 4]


pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def two_rank_reference(shakespeare_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref2") / "run"
    run(train_cmd(shakespeare_data, out, *LONG, nproc=2))
    return losses(out)


def assert_close(a: dict, b: dict):
    assert a.keys() == b.keys() == set(range(1, 13))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C in the terminal
def test_sigterm_checkpoints_the_current_step_and_a_rerun_finishes(stop, shakespeare_data, tmp_path):
    args = ["--max_steps", 20, "--ckpt_interval", 1000]
    full = tmp_path / "full"
    run(train_cmd(shakespeare_data, full, *args))
    out = tmp_path / "preempted"
    # Slow steps: the signal lands with most of the run still ahead, however fast the machine.
    slow = env_with_sitecustomize(tmp_path / "slow", SLOW_STEPS)
    proc = subprocess.Popen(train_cmd(shakespeare_data, out, *args), env=slow, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(out) >= 3)
    proc.send_signal(stop)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    stopped_at = max(losses(out))
    assert stopped_at < 20 and f"stopping on {stop.name} at step {stopped_at}" in stdout
    assert (out / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").exists()
    rerun = run(train_cmd(shakespeare_data, out, *args))
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in rerun.stdout
    assert losses(out) == losses(full)  # bit for bit on one CPU rank


def test_a_second_signal_exits_at_once(shakespeare_data, tmp_path):
    out = tmp_path / "twice"
    proc = subprocess.Popen(
        train_cmd(shakespeare_data, out, "--max_steps", 100000),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: logged_steps(out) >= 1)  # inside the training loop
    # Both signals land while the process is stopped, so they are handled back to back, before
    # the loop can act on the first (two signals of one kind would merge into one).
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGUSR1)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM  # the second one handled (signals are handled in number order)
    assert "stopping on" not in stdout and not (out / "checkpoints").exists()
    assert stderr.strip().splitlines()[-1] == (
        "SIGTERM after SIGUSR1: exiting at once, without the checkpoint; rerun the same command to resume from the "
        "newest complete one"
    )


# torch.distributed.new_group raises, in every Python process started with it on PYTHONPATH: a trainer
# that opens a second process group (a gloo one beside NCCL, say) fails.
ONE_PROCESS_GROUP = after_import(
    "torch.distributed.distributed_c10d",
    """def new_group(*args, **kwargs):
    raise RuntimeError("the trainer opened a second process group")
module.new_group = new_group
""",
)


def test_sigusr1_to_one_rank_stops_all_ranks_together(shakespeare_data, tmp_path):
    # Nothing logged in between: the request travels in the loss's all-reduce, on the job's one process group.
    one_group = env_with_sitecustomize(tmp_path / "one_group", ONE_PROCESS_GROUP)
    out = tmp_path / "usr1"
    # Checkpoints in the training thread: written in the background, they have a gloo group of their own.
    args = ["--max_steps", 100000, "--log_interval", 1000, "--ckpt_interval", 3, "--ckpt_async", "false"]
    proc = subprocess.Popen(
        train_cmd(shakespeare_data, out, *args, nproc=2),
        env=one_group,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rank1 = workers_of(proc)[1]
    wait_for(lambda: (out / "checkpoints" / "step_00000003").exists())
    os.kill(rank1, signal.SIGUSR1)  # rank 1 only
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    stopped_at = int(output.split("stopping on SIGUSR1 at step ")[1].split(":")[0])
    assert 3 < stopped_at < 1000
    # Both ranks wrote their part of the checkpoint at that step: they stopped after the same step.
    meta = json.loads((out / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").read_text())
    assert sorted(name for name in meta["files"] if name.endswith(".distcp")) == [
        "state/__0_0.distcp",
        "state/__1_0.distcp",
    ]


def test_killed_worker_under_max_restarts_resumes_and_matches(two_rank_reference, shakespeare_data, tmp_path):
    # torchrun's default, shared rendezvous store (pytorch#135712): the restart round must rejoin.
    out = tmp_path / "elastic"
    cmd = train_cmd(shakespeare_data, out, *LONG, nproc=2)
    cmd.insert(cmd.index(TRAIN), "--max-restarts=1")
    slow = env_with_sitecustomize(tmp_path / "slow", SLOW_STEPS)  # the kill lands with steps still to run
    proc = subprocess.Popen(cmd, env=slow, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (out / "checkpoints" / "step_00000004").exists())
    os.kill(workers_of(proc)[1], signal.SIGKILL)
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
    # Several nodes: with the fresh rendezvous store README asks for (restart counts are per node).
    # Slow steps: the kill lands with steps still to run.
    slow = env_with_sitecustomize(tmp_path / "slow", SLOW_STEPS, fresh_rendezvous_store=True)
    agents = [
        subprocess.Popen(cmd, env=slow, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)
    ]
    wait_for(lambda: (out / "checkpoints" / "step_00000004").exists())
    os.kill(children(agents[1].pid)[0], signal.SIGKILL)
    outputs = [a.communicate(timeout=240)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), [o[-3000:] for o in outputs]
    assert_close(losses(out), two_rank_reference)
    assert metrics(out)[-1]["step"] == 12


def workers_of(torchrun: subprocess.Popen) -> list[int]:
    """The worker PIDs of a torchrun agent (its children), in rank order once all have started."""
    wait_for(lambda: len(children(torchrun.pid)) == 2)
    return children(torchrun.pid)


def test_a_signal_is_acted_on_at_the_next_step_whatever_log_interval(shakespeare_data, tmp_path):
    out = tmp_path / "grace"
    args = ["--max_steps", 100000, "--log_interval", 1000, "--ckpt_interval", 5]
    proc = subprocess.Popen(
        train_cmd(shakespeare_data, out, *args, nproc=2),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    workers = workers_of(proc)
    wait_for(lambda: (out / "checkpoints" / "step_00000005").exists())
    for pid in workers:  # as Slurm's scancel / preemption: every task gets SIGTERM
        os.kill(pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    stopped_at = int(output.split("stopping on SIGTERM at step ")[1].split(":")[0])
    assert 5 < stopped_at < 1000
    assert (out / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").exists()
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()


# A file system where every fsync takes a second (a slow shared one): rank 0's checkpoint commit
# then takes seconds while rank 1 waits for it in a collective.
SLOW_FSYNC = "import os, time\n_fsync = os.fsync\nos.fsync = lambda fd: (time.sleep(1.0), _fsync(fd))[1]\n"
COLLECTIVE_TIMEOUT_S = 3
# An evaluation longer than a step may take, on every rank: made so, not left to the machine's speed.
SLOW_EVAL = slowed("gpt2repro.evaluate", "val_loss", COLLECTIVE_TIMEOUT_S + 1)


@pytest.mark.parametrize("ckpt_async", ["true", "false"])
def test_an_eval_and_a_checkpoint_longer_than_the_collective_timeout_are_no_hang(
    ckpt_async, shakespeare_data, tmp_path
):
    slow = env_with_sitecustomize(tmp_path / "slow", SLOW_FSYNC, SLOW_EVAL)
    out = tmp_path / "slow"
    args = [
        "--ckpt_async",
        ckpt_async,
        "--max_steps",
        6,
        "--eval_interval",
        3,
        "--ckpt_interval",
        3,
        "--collective_timeout_s",
        COLLECTIVE_TIMEOUT_S,
    ]
    proc = subprocess.run(
        train_cmd(shakespeare_data, out, *args, nproc=2), capture_output=True, text=True, env=slow, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["step"]: r for r in metrics(out)}
    assert max(records) == 6
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # In the background the write goes on beside the steps (the watchdog bounds each step alone) and the end
    # of the run waits for it; in the training thread it is a stretch of its own.
    written = {r["ckpt_step"]: r["ckpt_write_s"] for r in lines if "ckpt_write_s" in r}
    for step in (3, 6):  # each took longer than a step may: the watchdog bounds them separately
        took = written[step] if ckpt_async == "true" else records[step]["ckpt_s"]
        assert records[step]["eval_s"] > COLLECTIVE_TIMEOUT_S and took > COLLECTIVE_TIMEOUT_S, records[step]


def test_a_hung_rank_fails_the_job_with_one_clear_line(shakespeare_data, tmp_path):
    out = tmp_path / "hung"
    # No eval or checkpoint in sight: past start-up (the first step), every stretch is a training step,
    # bounded by collective_timeout_s (evaluations and checkpoints have the long bound, see the test above).
    args = ["--max_steps", 100000, "--collective_timeout_s", 5]
    proc = subprocess.Popen(
        train_cmd(shakespeare_data, out, *args, nproc=2),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rank0, rank1 = workers_of(proc)
    wait_for(lambda: logged_steps(out) >= 3)
    os.kill(rank1, signal.SIGSTOP)  # hung: alive, holding its sockets, never answering
    wait_for(lambda: rank0 not in children(proc.pid))  # rank 0 gives up by itself
    os.kill(rank1, signal.SIGKILL)  # spares torchrun's 30 s grace period for a stopped process
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # The trainer's watchdog speaks (no backend detail in brackets), long before gloo's own timeout would
    # (the process group's, past the 30 min bound): under NCCL that one aborts with a C++ exception instead.
    assert (
        "error: rank 0: a collective did not complete within collective_timeout_s=5 s, so a rank is hung or dead;"
        in output
    ), output[-3000:]
    assert "Traceback" not in output.split("error: rank 0")[0][-2000:]


def test_a_failure_on_one_rank_is_reported_by_that_rank_and_ends_the_job(tmp_path):
    data = tmp_path / "poisoned"
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, 1000, 20_000)
    spec = BatchSpec(batch_size=4, grad_accum_steps=1, world_size=2, rank=1)
    shards.write_shard(data / "x_val_000000.bin", tokens[:2000])
    shards.write_shard(data / "x_train_000000.bin", tokens)
    loader = ShardLoader(str(data), 32, 50257, spec, seed=1337, device="cpu")
    poisoned = tokens.copy()  # rank 1's rows of step 2 (found with the trainer's own loader) get an id past GPT-2's
    for g in range(2 * 8 + 4, 2 * 8 + 8):  # step 2 = global windows 16..23; rank 1's are 20..23
        start = int(loader._epoch_order(0)[1][g]) * 32
        poisoned[start + 5] = 60000
    shards.write_shard(data / "x_train_000000.bin", poisoned)
    proc = run(train_cmd(data, tmp_path / "out", "--max_steps", 10, nproc=2), check=False, timeout=240)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: rank 1: The train data holds token id 60000"), proc.stderr[-3000:]
    assert all("collective did not complete" not in e for e in errors)  # ended by the failure, not by a timeout
    assert max(losses(tmp_path / "out")) == 2


def test_out_of_memory_is_one_line_naming_the_planner(shakespeare_data, tmp_path):
    # 20000 x 32 tokens of 50304 logits at once (the plain loss): 129 GB, more than this machine will ever allocate.
    cmd = train_cmd(shakespeare_data, tmp_path / "oom", "--batch_size", 20000, "--max_steps", 2, "--fused_loss=false")
    proc = run(cmd, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of host memory"), proc.stderr[-3000:]
    assert "--dry_run true" in lines[0] and "--batch_size" in lines[0] and "--activation_checkpointing" in lines[0]
