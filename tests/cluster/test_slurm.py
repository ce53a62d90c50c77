"""launch/slurm/train.sbatch on a real two-node Slurm cluster on this machine (tests/cluster/slurm.sh).

Each node is its own network namespace with its own hostname and address; 2 nodes x 2 gloo
ranks. As root on Linux only; elsewhere the tests skip with the reason slurm.sh gives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2repro import checkpoint
from gpt2repro.weights import open_weights
from tests.distributed.helpers import (
    REPO,
    SLOW_STEPS,
    TINY,
    env,
    env_with_sitecustomize,
    hold_before_quorum,
    logged_steps,
    losses,
    run,
    train_cmd,
    wait_for,
)

SLURM_SH = str(REPO / "tests" / "cluster" / "slurm.sh")
SBATCH = str(REPO / "launch" / "slurm" / "train.sbatch")
STEPS = 24
# The CPU overrides of the GPU defaults in train.sbatch: 2 gloo ranks per node, no GPUs to ask for.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]
# A gentle learning rate: at the demo's 8e-3 AdamW amplifies rounding (summation order) to 1e-3 in 25 steps.
TRAIN = [*TINY, "--dtype", "float32", "--compile", "false", "--max_steps", STEPS, "--lr", "1e-3", "--min_lr", "1e-4"]


pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier


def slurm(*args: str, check: bool = True, timeout: float = 60, extra_env: dict | None = None):
    proc = subprocess.run(
        ["bash", SLURM_SH, *args], capture_output=True, text=True, timeout=timeout, env={**env(), **(extra_env or {})}
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cluster():
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the Slurm cluster needs Linux and root (namespaces, daemons, apt-get)")
    up = slurm("up", check=False, timeout=300)
    if up.returncode != 0:
        reason = (up.stderr.strip().splitlines() or ["slurm.sh up failed"])[-1]
        if "cannot create network namespaces" in reason or "needs" in reason:
            pytest.skip(reason)
        pytest.fail(up.stdout + up.stderr)
    yield
    slurm("down", check=False)


def submit(data: Path, out: Path, *extra: str, sbatch_env: dict | None = None) -> tuple[str, Path]:
    """(job id, its log file): train.sbatch as users run it, with the CPU overrides."""
    log = out.parent / f"{out.name}.log"
    cmd = [
        "run",
        "sbatch",
        "--parsable",
        *CPU_JOB,
        f"--output={log}",
        SBATCH,
        "--data",
        str(data),
        "--out",
        str(out),
        *map(str, TRAIN),
        *map(str, extra),
    ]
    job = slurm(*cmd, extra_env={"GPUS_PER_NODE": "2", **(sbatch_env or {})}).stdout.strip()
    return job, log


def job_state(job: str) -> tuple[str, int]:
    text = slurm("run", "scontrol", "show", "job", job, "-o").stdout
    return re.search(r"JobState=(\S+)", text).group(1), int(re.search(r"Restarts=(\d+)", text).group(1))


def wait_for_end(job: str, timeout: float = 180) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, _ = job_state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    slurm("run", "scancel", job, check=False)
    raise AssertionError(f"job {job} did not end within {timeout} s")


def kill_node_step(node: str) -> list[int]:
    """kill -9 every process of this node's job step (its torchrun agent and workers), as a lost node."""
    pids = subprocess.run(["ip", "netns", "pids", f"g2r-{node}"], capture_output=True, text=True).stdout.split()
    mine = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"launch/slurm/node.py" in cmdline or b"launch/train.py" in cmdline:
            mine.append(int(pid))
    for pid in mine:
        os.kill(pid, 9)
    return mine


@pytest.fixture(scope="module")
def uninterrupted(cluster, shakespeare_data, tmp_path_factory):
    """The job as users submit it, start to end: 2 nodes x 2 ranks."""
    out = tmp_path_factory.mktemp("cluster") / "uninterrupted"
    job, log = submit(shakespeare_data, out)
    assert wait_for_end(job) == "COMPLETED", log.read_text()[-3000:]
    return out, log.read_text()


def test_sbatch_trains_across_two_nodes_as_one_process(uninterrupted, shakespeare_data, tmp_path):
    out, log = uninterrupted
    assert "4 rank(s)" in log and "Traceback" not in log and "node_rank" not in log, log[-3000:]
    one = tmp_path / "one"  # the same global batch (16 sequences) on one process
    run(train_cmd(shakespeare_data, one, *TRAIN[len(TINY) :], "--grad_accum_steps", 4))
    assert_same_losses(one, out)


def assert_same_losses(out: Path, reference: Path, rel: float = 1e-5) -> None:
    """Equal to float rounding. Not bitwise across ranks: DDP rebuilds its gradient buckets after each
    process's first step, so the first step after a resume all-reduces in another chunking, and gloo's
    sums round differently (7th digit). One process resumes bit for bit (tests/distributed/test_train.py)."""
    a, b = losses(out), losses(reference)
    assert a.keys() == b.keys() == set(range(1, STEPS + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rel, abs=0), step


def slow_steps(tmp_path: Path) -> dict:
    """The job's environment additions for training steps of SLOW_STEP_S at least."""
    return {"PYTHONPATH": env_with_sitecustomize(tmp_path / "slow_steps", SLOW_STEPS)["PYTHONPATH"]}


def stops(text: str) -> list[int]:
    return [int(step) for step in re.findall(r"stopping on SIGTERM at step (\d+)", text)]


def test_requeue_and_the_time_limit_warning_checkpoint_and_resume(uninterrupted, shakespeare_data, tmp_path):
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", Path(SBATCH).read_text(), re.M)  # asked of Slurm
    out = tmp_path / "requeued"
    # Slow steps: each signal lands with steps still to run, however fast the machine.
    job, log = submit(shakespeare_data, out, sbatch_env=slow_steps(tmp_path))
    wait_for(lambda: logged_steps(out) >= 6)
    slurm("run", "scontrol", "requeue", job)  # preemption: Slurm signals the steps and requeues the job
    wait_for(lambda: "resumed from" in log.read_text() and logged_steps(out) >= stops(log.read_text())[0] + 4)
    slurm("run", "scancel", "--signal=USR1", "--batch", job)  # what Slurm sends before the time limit
    assert wait_for_end(job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    first, second = stops(text)
    assert 6 <= first < second < STEPS and "time limit near: checkpointing, then requeueing" in text
    for step in (first, second):  # every rank checkpointed that step, and the job came back from it
        assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in text
    assert job_state(job)[1] == 2 and "Traceback" not in text, text[-3000:]
    assert_same_losses(out, uninterrupted[0])


def test_a_lost_node_requeues_the_job_until_the_limit(uninterrupted, shakespeare_data, tmp_path):
    out = tmp_path / "node_lost"
    slow = slow_steps(tmp_path)  # each kill lands with steps still to run, however fast the machine
    job, log = submit(shakespeare_data, out, "--ckpt_interval", 5, sbatch_env={**slow, "MAX_REQUEUES": "1"})
    wait_for(lambda: (out / "checkpoints" / "step_00000005").exists())
    assert kill_node_step("n2"), "no process of the job on n2"
    wait_for(lambda: (out / "checkpoints" / "step_00000015").exists())
    text = log.read_text()
    lost = [line for line in text.splitlines() if "was lost" in line]
    assert lost == [
        f"node n2 (srun task 1, 2 ranks) was lost; requeueing job {job} (1 of 1) to resume from the newest checkpoint"
    ], text[-3000:]
    assert re.search(r"resumed from .*step_0000000(5|10)", text), text[-3000:]
    assert kill_node_step("n2")  # once more: past MAX_REQUEUES
    assert wait_for_end(job) == "FAILED"
    errors = [line for line in log.read_text().splitlines() if line.startswith("error: node")]
    assert errors == [
        f"error: node n2 (srun task 1, 2 ranks) was lost, and job {job} was already requeued 1 time(s) "
        "(MAX_REQUEUES=1); resubmit it to resume from the newest checkpoint"
    ]
    reference = losses(uninterrupted[0])  # every step it logged is the uninterrupted run's
    for step, loss in losses(out).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


def test_hsdp_across_the_nodes_trains_as_ddp_and_resumes_on_one_process(uninterrupted, shakespeare_data, tmp_path):
    out = tmp_path / "hsdp"
    job, log = submit(shakespeare_data, out, "--strategy", "hsdp", "--ckpt_interval", 12)
    assert wait_for_end(job) == "COMPLETED", log.read_text()[-3000:]
    assert "hsdp on 4 rank(s)" in log.read_text()
    assert_same_losses(out, uninterrupted[0])
    meta = (out / "checkpoints" / "step_00000012" / "meta.json").read_text()
    assert '"strategy": "hsdp"' in meta and '"world_size": 4' in meta
    one = tmp_path / "one"  # the 2 x 2 sharded, replicated checkpoint of step 12, on one process
    shutil.copytree(out, one)
    shutil.rmtree(one / "checkpoints" / "step_00000024")
    proc = run(train_cmd(shakespeare_data, one, *TRAIN[len(TINY) :], "--grad_accum_steps", 4))
    assert "resumed from" in proc.stdout and "step_00000012" in proc.stdout
    assert_same_losses(one, out)


def went_on_alone(run_dir: Path) -> bool:
    """A quorum of one group in run_dir's records, and a step taken after it."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    alone = [i for i, r in enumerate(records) if r.get("ft_groups_live") == 1]
    return bool(alone) and any("loss" in r for r in records[alone[0] :])


def test_fault_tolerant_nodes_go_on_without_a_lost_one_and_heal_it(uninterrupted, shakespeare_data, tmp_path):
    """FT=1: each node a replica group under torchft, the lighthouse on the first. kill -9 of every process of n2's
    group: n1's goes on alone without a restart; the job starts n2's group again, which heals from n1's; the job
    completes with the uninterrupted run's losses and both groups' weights bitwise equal."""
    out, hold = tmp_path / "ft", tmp_path / "hold"
    # Slow steps, and n1's group held before its quorum while n2's restarts: the kill and the heal land with steps
    # still to run, however fast or loaded the machine.
    site = env_with_sitecustomize(tmp_path / "site", SLOW_STEPS, hold_before_quorum(hold, 0))["PYTHONPATH"]
    job, log = submit(shakespeare_data, out, sbatch_env={"PYTHONPATH": site, "FT": "1"})
    wait_for(lambda: logged_steps(out / "group_1") >= 6, timeout=180)
    assert kill_node_step("n2"), "no process of the job on n2"
    wait_for(lambda: went_on_alone(out / "group_0"), timeout=180)
    hold.touch()
    wait_for(lambda: log.read_text().count("replica group 1 of 2") == 2, timeout=180)  # n2's group built again
    hold.unlink()
    assert wait_for_end(job, timeout=300) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    lost = [line for line in text.splitlines() if line.startswith("replica group") and "was lost" in line]
    assert len(lost) == 1 and re.fullmatch(
        r"replica group 1 \(node n2\) was lost \(exit \d+\); starting it again \(1 of 3\): it heals from the live "
        r"groups",
        lost[0],
    ), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    survivor = [json.loads(line) for line in (out / "group_0" / "metrics.jsonl").open()]
    assert sum("startup_s" in r for r in survivor) == 1  # n1's group never restarted
    assert 1 in [r["ft_groups_live"] for r in survivor if "ft_groups_live" in r]  # it went on alone
    healed = [json.loads(line) for line in (out / "group_1" / "metrics.jsonl").open()]
    assert any(r.get("ft_healed_from_step") is not None for r in healed), healed[-5:]
    reference = losses(uninterrupted[0])  # the same global batch: 2 groups x 2 ranks, 4 ranks
    for group in (0, 1):
        got = losses(out / f"group_{group}")
        for step, loss in got.items():
            assert loss == pytest.approx(reference[step], rel=1e-5), (group, step)
    assert sorted(losses(out / "group_0")) == list(range(1, STEPS + 1))
    final = [open_weights(str(checkpoint.newest_complete(out / f"group_{g}"))) for g in (0, 1)]
    assert final[0].about.step == final[1].about.step == STEPS
    for name, tensor in final[0].state.items():
        assert torch.equal(tensor, final[1].state[name]), name


def test_down_leaves_nothing_behind(cluster):
    slurm("down")
    assert not [n for n in os.listdir("/run/netns") if n.startswith("g2r-")] if os.path.isdir("/run/netns") else True
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "g2r-" not in links
    cluster_dir = os.environ.get("GPT2REPRO_SLURM_DIR", "/tmp/gpt2repro-slurm")
    procs = subprocess.run(["pgrep", "-a", "-f", cluster_dir], capture_output=True, text=True)  # its daemons' args
    assert procs.stdout.strip() == "", procs.stdout
    assert not subprocess.run(["pgrep", "-a", "slurmstepd"], capture_output=True, text=True).stdout
    assert not Path(cluster_dir).exists()
