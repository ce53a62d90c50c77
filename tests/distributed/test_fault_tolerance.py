"""Per-step fault tolerance across replica groups (gpt2repro/ft.py), with real processes: a torchft lighthouse,
replica groups that are real launches (torchrun for groups of 2 ranks), kill -9 at a chosen step, restarts.

The oracle of every run is the same training without fault tolerance: one torchrun job of as many DDP ranks as the
groups have in all, whose global batch is the same (the groups split it as its ranks do). A run with failures
must log the oracle's losses within LOSS_RTOL (the order of the sums differs while a group is missing), and end
with every group's weights bitwise equal.
"""

import json
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gpt2repro import checkpoint
from gpt2repro.weights import open_weights
from tests.distributed.helpers import (
    after_import,
    env,
    env_with_sitecustomize,
    free_port,
    hold_before_quorum,
    losses,
    metrics,
    run,
    train_cmd,
    wait_for,
)

pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier

STEPS = 40
FT_TIMEOUT_S = 20.0
HEARTBEAT_TIMEOUT_MS = 3000  # the lighthouse stops counting a lost group after this
# A gentle learning rate: at the demo's 8e-3 AdamW amplifies rounding (summation order) to 1e-3 in 25 steps, with
# or without fault tolerance (1 rank x 3 accumulation steps against 3 ranks: 2.4e-3 at step 25; at 2e-3: 7.6e-7).
COMMON = ["--max_steps", STEPS, "--lr", 2e-3, "--ckpt_interval", 10, "--eval_interval", 20]
COMMON += ["--ft_timeout_s", FT_TIMEOUT_S]
LOSS_RTOL = 1e-5  # the sums' order: a missing group's shares are accumulated, not all-reduced
STEP_S = 0.25  # every step at least this long: a kill and a restart land with steps still to run


@contextmanager
def lighthouse(port: int):
    """A torchft lighthouse on localhost:port for the test; yields a restart() function."""
    cmd = [
        "torchft_lighthouse",
        "--min_replicas",
        "1",
        "--bind",
        f"[::]:{port}",
        "--heartbeat_timeout_ms",
        str(HEARTBEAT_TIMEOUT_MS),
        "--join_timeout_ms",
        "60000",
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]

    def restart(down_s: float = 0.0, never: bool = False):
        procs[-1].kill()
        procs[-1].wait()
        if never:
            return
        time.sleep(down_s)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    try:
        yield restart
    finally:
        for p in procs:
            p.kill()
            p.wait()


def step_patch(kill_at: int | None = None) -> str:
    """sitecustomize code: every training step takes at least STEP_S; kill_at: the process kills itself (-9)
    as it begins that step (after the step's quorum: its peers are left waiting in the step's all-reduce)."""
    patch = f"""import functools, os, signal, time
_original = module.train_step
@functools.wraps(_original)
def _step(engine, step, *args, **kwargs):
    if step == {kill_at!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep({STEP_S!r})
    return _original(engine, step, *args, **kwargs)
module.train_step = _step
"""
    return after_import("gpt2repro.train", patch)


HEAL_KILL = after_import(
    "gpt2repro.checkpoint",
    "import os, signal\nmodule.Checkpointer.load_live_state = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)",
)


class Job:
    """The replica groups of one run under fault tolerance: each launched (and relaunched) on its own."""

    def __init__(self, data: Path, out: Path, tmp: Path, groups: int, port: int, nproc: int = 1, extra=()):
        self.data, self.out, self.tmp, self.groups, self.port, self.nproc = data, out, tmp, groups, port, nproc
        self.extra = [*COMMON, *extra]
        self.procs: dict[int, list[subprocess.Popen]] = {g: [] for g in range(groups)}
        self.launches = 0
        self.hold_file = tmp / "hold"

    def cmd(self, group: int) -> list[str]:
        ft = ["--ft_groups", self.groups, "--ft_group", group, "--ft_lighthouse", f"localhost:{self.port}"]
        return train_cmd(self.data, self.out, *self.extra, *ft, nproc=self.nproc)

    def launch(self, group: int, *codes: str, args=()) -> subprocess.Popen:
        self.launches += 1
        hold = hold_before_quorum(self.hold_file, 0)
        environ = env_with_sitecustomize(self.tmp / f"site{self.launches}", step_patch(), hold, *codes)
        log = self.tmp / f"group{group}.launch{self.launches}.log"
        with log.open("w") as out:
            cmd = [*self.cmd(group), *map(str, args)]
            proc = subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT, text=True)
        proc.log = log
        self.procs[group].append(proc)
        return proc

    def launch_killed_at(self, group: int, step: int) -> subprocess.Popen:
        return self.launch(group, step_patch(step))

    def rejoin(self, *groups: int, codes=(), args=(), dies: bool = False) -> list[subprocess.Popen]:
        """Launch `groups` again while group 0 is held before its next quorum, until each has built its run and
        is about to ask for its own (or has died, `dies`): they all join group 0 at its next step."""
        self.hold_file.touch()
        try:
            procs = [self.launch(group, *codes, args=args) for group in groups]
            for proc in procs:
                ready = lambda p=proc: p.poll() is not None if dies else "replica group" in p.log.read_text()  # noqa: E731
                wait_for(ready, timeout=240)
            return procs
        finally:
            self.hold_file.unlink()

    def group_dir(self, group: int) -> Path:
        return self.out / f"group_{group}"

    def step_of(self, group: int) -> int:
        """The newest step group's metrics.jsonl has a training record of (0 before any)."""
        path = self.group_dir(group) / "metrics.jsonl"
        if not path.exists():
            return 0
        return max((r["step"] for r in metrics(self.group_dir(group)) if "loss" in r), default=0)

    def wait(self, timeout: float = 240) -> None:
        for group, procs in self.procs.items():
            if procs:
                rc = procs[-1].wait(timeout=timeout)
                assert rc == 0, f"group {group} exited {rc}\n{procs[-1].log.read_text()[-3000:]}"

    def kill_all(self) -> None:
        for procs in self.procs.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


@pytest.fixture
def job_factory(shakespeare_data, tmp_path):
    jobs = []

    def make(groups: int, nproc: int = 1, extra=()) -> tuple[Job, int]:
        port = free_port()
        job = Job(shakespeare_data, tmp_path / "run", tmp_path, groups, port, nproc, extra)
        jobs.append(job)
        return job, port

    yield make
    for job in jobs:
        job.kill_all()


def oracle(data: Path, out: Path, ranks: int, *extra) -> dict[int, float]:
    """The losses of the same run without fault tolerance: one job of `ranks` DDP ranks (the groups' in all)."""
    run(train_cmd(data, out, *COMMON, *extra, nproc=ranks), environ=env(), timeout=600)
    return losses(out)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return open_weights(str(checkpoint.newest_complete(run_dir))).state


def assert_same_weights(job: Job) -> None:
    """Every group ends at the same step with bitwise the same weights."""
    first = final_weights(job.group_dir(0))
    for group in range(1, job.groups):
        other = final_weights(job.group_dir(group))
        assert other.keys() == first.keys()
        for name, tensor in first.items():
            assert torch.equal(tensor, other[name]), f"group {group}'s {name} differs from group 0's"


def assert_losses_match(job: Job, expected: dict[int, float], survivors=(0,)) -> None:
    """Every loss any group logged is the oracle's within LOSS_RTOL; each survivor logged every step, once; a
    healed group's losses after its heal equal the survivors' bit for bit (they took those steps together)."""
    for group in range(job.groups):
        for step, loss in losses(job.group_dir(group)).items():
            assert loss == pytest.approx(expected[step], rel=LOSS_RTOL), f"group {group} step {step}"
    for group in survivors:
        got = losses(job.group_dir(group))
        assert sorted(got) == sorted(expected), f"group {group} logged steps {sorted(got)}"
    reference = losses(job.group_dir(survivors[0]))
    for group in range(job.groups):
        healed = [r["step"] for r in ft_records(job, group) if r.get("ft_healed_from_step") is not None]
        for step, loss in losses(job.group_dir(group)).items():
            if healed and step > max(healed):
                assert loss == reference[step], f"group {group} step {step} after its heal"


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records as written, one per line (not merged by step)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ft_records(job: Job, group: int) -> list[dict]:
    return [r for r in records(job.group_dir(group)) if any(k.startswith("ft_") for k in r)]


def assert_survivor_waits_bounded(job: Job, group: int, lost_at_least: int = 1) -> None:
    """The survivor never restarted (one start-up), saw the quorum shrink, and no failed step and no quorum kept
    it waiting longer than the quorum timeout."""
    written = records(job.group_dir(group))
    assert sum("startup_s" in r for r in written) == 1, "the survivor restarted"
    lives = [r["ft_groups_live"] for r in written if "ft_groups_live" in r]
    assert min(lives) <= job.groups - lost_at_least, lives
    for r in written:
        for key in ("ft_step_failed_s", "ft_quorum_s"):
            if key in r:
                assert r[key] < FT_TIMEOUT_S, r


def test_a_group_killed_mid_step_costs_a_step_and_heals_from_its_peer(job_factory, shakespeare_data, tmp_path):
    """2 groups of 1 rank: group 1 is killed -9 as it begins step 8 (group 0 is left in the step's all-reduce),
    and restarted from its own checkpoints later; group 0 never stops, and group 1 heals from it."""
    job, port = job_factory(groups=2)
    with lighthouse(port):
        job.launch(0)
        killed = job.launch_killed_at(1, 8)
        killed.wait(timeout=240)
        assert killed.returncode == -signal.SIGKILL
        wait_for(lambda: job.step_of(0) >= 12, timeout=240)  # group 0 goes on alone
        job.rejoin(1)
        job.wait()
    expected = oracle(shakespeare_data, tmp_path / "oracle", 2)
    assert_losses_match(job, expected)
    assert_same_weights(job)
    assert_survivor_waits_bounded(job, 0)
    healed = [r for r in ft_records(job, 1) if r.get("ft_healed_from_step") is not None]
    assert healed and healed[-1]["step"] >= 12, healed  # it caught up with group 0, not from its own checkpoint
    assert any(r.get("ft_step_failed_s") is not None for r in ft_records(job, 0))  # the step it was left in


def test_a_group_killed_while_it_heals_heals_when_restarted_again(job_factory, shakespeare_data, tmp_path):
    """2 groups of 2 FSDP ranks each: group 1 is killed at step 6, restarted and killed again while it heals (as
    it loads the peer's state), then restarted for good: group 0 goes on through both, its shards and group 1's
    end equal."""
    job, port = job_factory(groups=2, nproc=2, extra=["--strategy", "fsdp", "--batch_size", 2])
    with lighthouse(port):
        job.launch(0)
        job.launch_killed_at(1, 6).wait(timeout=240)
        wait_for(lambda: job.step_of(0) >= 10, timeout=240)
        (healing,) = job.rejoin(1, codes=[HEAL_KILL], dies=True)
        assert healing.returncode != 0
        at = job.step_of(0)
        wait_for(lambda: job.step_of(0) >= at + 3, timeout=240)  # the survivor went on
        job.rejoin(1)
        job.wait()
    expected = oracle(shakespeare_data, tmp_path / "oracle", 4, "--strategy", "fsdp", "--batch_size", 2)
    assert_losses_match(job, expected)
    assert_same_weights(job)
    assert_survivor_waits_bounded(job, 0)


def test_two_groups_lost_at_once_the_third_goes_on_alone(job_factory, shakespeare_data, tmp_path):
    """3 groups of 1 rank: groups 1 and 2 are killed at the same step; group 0 takes every step alone (three
    shares each) until both come back and heal."""
    job, port = job_factory(groups=3)
    with lighthouse(port):
        job.launch(0)
        lost = [job.launch_killed_at(g, 8) for g in (1, 2)]
        for proc in lost:
            proc.wait(timeout=240)
        wait_for(lambda: job.step_of(0) >= 14, timeout=240)
        job.rejoin(1, 2)
        job.wait()
    expected = oracle(shakespeare_data, tmp_path / "oracle", 3)
    assert_losses_match(job, expected)
    assert_same_weights(job)
    assert_survivor_waits_bounded(job, 0, lost_at_least=2)


def test_the_lighthouse_restarted_mid_run(job_factory, shakespeare_data, tmp_path):
    """The lighthouse is killed at step 10 and is back 2 s later: no group restarts, nothing is lost."""
    job, port = job_factory(groups=2)
    with lighthouse(port) as restart_lighthouse:
        job.launch(0)
        job.launch(1)
        wait_for(lambda: job.step_of(0) >= 10, timeout=240)
        restart_lighthouse(down_s=2.0)
        job.wait()
    expected = oracle(shakespeare_data, tmp_path / "oracle", 2)
    assert_losses_match(job, expected, survivors=(0, 1))
    assert_same_weights(job)
    for group in (0, 1):
        assert sum("startup_s" in r for r in records(job.group_dir(group))) == 1


def test_a_whole_job_restart_resumes_every_group_exactly(job_factory, shakespeare_data, tmp_path):
    """Both groups killed -9 (group 1 first, group 0 at a later step: their newest checkpoints differ), then the
    whole job relaunched: each group resumes from its own checkpoint, the one behind heals from the other, and
    the run ends as the oracle's."""
    job, port = job_factory(groups=2)
    with lighthouse(port):
        job.launch_killed_at(0, 25)
        job.launch_killed_at(1, 14)
        for procs in job.procs.values():
            procs[-1].wait(timeout=240)
        assert checkpoint.step_of(checkpoint.newest_complete(job.group_dir(1))) == 10
        assert checkpoint.step_of(checkpoint.newest_complete(job.group_dir(0))) == 20
        job.launch(0)
        job.launch(1)
        job.wait()
    expected = oracle(shakespeare_data, tmp_path / "oracle", 2)
    assert_losses_match(job, expected)
    assert_same_weights(job)


def test_errors_are_one_line(shakespeare_data, tmp_path):
    """No lighthouse there; then a lighthouse but fewer live groups than --ft_min_groups: one line each, saying
    what happened and what to do, within the quorum timeout."""
    port = free_port()
    base = ["--ft_groups", 2, "--ft_lighthouse", f"localhost:{port}", "--ft_timeout_s", 3, "--max_steps", 4]
    proc = run(train_cmd(shakespeare_data, tmp_path / "a", *base), check=False, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "lighthouse" in line]
    assert len(errors) == 1 and f"localhost:{port}" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    with lighthouse(port):
        started = time.time()
        cmd = train_cmd(shakespeare_data, tmp_path / "b", *base, "--ft_min_groups", 2)
        proc = run(cmd, check=False, timeout=120)
        assert time.time() - started < 60
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "--ft_min_groups" in line]
    assert len(errors) == 1 and "only 1 of the 2 groups" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    no_lighthouse = {k: v for k, v in env().items() if k != "TORCHFT_LIGHTHOUSE"}
    proc = run(train_cmd(shakespeare_data, tmp_path / "c", "--ft_groups", 2), check=False, environ=no_lighthouse)
    assert proc.returncode != 0 and "--ft_lighthouse HOST:PORT or set TORCHFT_LIGHTHOUSE" in proc.stderr
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.pt"))


def test_a_group_with_another_config_is_refused_at_its_heal(job_factory, shakespeare_data, tmp_path):
    """A group launched with another learning rate than the group it heals from: refused in one line, naming the
    difference, and the running group goes on."""
    job, port = job_factory(groups=2)
    with lighthouse(port):
        job.launch(0)
        wait_for(lambda: job.step_of(0) >= 4, timeout=240)
        (other,) = job.rejoin(1, args=["--lr", "1e-3"])
        other.wait(timeout=240)
        job.procs[1].clear()  # only group 0 is to finish
        job.wait()
    assert other.returncode != 0
    text = other.log.read_text()
    errors = [line for line in text.splitlines() if "another run" in line]
    assert len(errors) == 1 and "lr: 0.002 -> 0.001" in errors[0], text[-2000:]
    assert "Traceback" not in text


def test_groups_started_together_with_different_settings_are_refused(job_factory):
    """Two fresh groups (no heal ever compares their state), group 1 with another learning rate: the first quorum
    compares every group's settings, and both stop in one line naming the one that differs."""
    job, port = job_factory(groups=2)
    with lighthouse(port):
        procs = [job.launch(0), job.launch(1, args=["--lr", "1e-3"])]
        for proc in procs:
            proc.wait(timeout=240)
    for proc in procs:
        text = proc.log.read_text()
        assert proc.returncode != 0
        errors = [line for line in text.splitlines() if "different settings" in line]
        assert len(errors) == 1 and "(lr differ)" in errors[0], text[-2000:]
        assert "Traceback" not in text


def test_a_lighthouse_lost_for_good_ends_the_groups_with_their_last_step_checkpointed(job_factory):
    """The lighthouse killed at step 10 and never restarted: every group stops within its quorum timeout, in one
    line, and checkpoints the last step it took first (a rerun resumes there, not from scratch)."""
    job, port = job_factory(groups=2)
    with lighthouse(port) as restart_lighthouse:
        procs = [job.launch(g, args=["--ft_timeout_s", 5]) for g in (0, 1)]
        wait_for(lambda: job.step_of(0) >= 10, timeout=240)
        restart_lighthouse(never=True)
        for proc in procs:
            proc.wait(timeout=240)
    for group, proc in enumerate(procs):
        text = proc.log.read_text()
        assert proc.returncode != 0
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no quorum" in errors[0], text[-2000:]
        newest = checkpoint.step_of(checkpoint.newest_complete(job.group_dir(group)))
        assert newest == job.step_of(group) >= 10
