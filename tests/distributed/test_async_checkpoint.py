"""Checkpoints written in the background (--ckpt_async, the default) with real processes: a kill -9 at each
moment of a background save leaves nothing that looks complete and the run resumes bitwise; retention keeps
the last complete checkpoint while a newer one is written; the next checkpoint, a stop and the end of the run
wait for the save in flight. Each moment is forced: the save is held there (a patch loaded through
sitecustomize) until the test kills the run or lets it go."""

import fcntl
import os
import signal
import subprocess
from pathlib import Path

import pytest

from gpt2repro import checkpoint
from tests.distributed.helpers import (
    after_import,
    env_with_sitecustomize,
    logged_steps,
    losses,
    metrics,
    run,
    train_cmd,
    wait_for,
)

pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier

ARGS = ["--max_steps", 12, "--ckpt_interval", 4, "--keep_ckpts", 1]

# Holds the save of the checkpoint whose path names HOLD_STEP at a moment: it writes HOLD_MARK, then waits for
# HOLD_RELEASE to exist (forever, when the test kills the run instead).
_HOLD = """import functools, os, pathlib, time
def _hold(where):
    if os.environ["HOLD_STEP"] in str(where):
        pathlib.Path(os.environ["HOLD_MARK"]).write_text(str(where))
        while not pathlib.Path(os.environ["HOLD_RELEASE"]).exists():
            time.sleep(0.02)
"""
HOLDS = {
    # DCP has written this rank's data files, not yet its .metadata (DCP's thread)
    "data written": after_import(
        "torch.distributed.checkpoint.filesystem",
        _HOLD
        + """_write = module._FileSystemWriter.write_data
def write_data(self, plan, planner):
    result = _write(self, plan, planner)
    _hold(self.path)
    return result
module._FileSystemWriter.write_data = write_data
""",
    ),
    # every file written and hashed; trainer.pt and meta.json not yet (the commit thread)
    "hashed": after_import(
        "gpt2repro.checkpoint",
        _HOLD
        + """_commit = module._commit
def commit(tmp, final, *args):
    _hold(final)
    return _commit(tmp, final, *args)
module._commit = commit
""",
    ),
    # meta.json written in the temporary directory, which is not yet renamed into place
    "meta written": after_import(
        "gpt2repro.checkpoint",
        _HOLD
        + """_write_json = module.write_json_atomic
def write_json_atomic(path, record):
    _write_json(path, record)
    _hold(path)
module.write_json_atomic = write_json_atomic
""",
    ),
}


def descendants(pid: int) -> list[int]:
    try:
        children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return [grandchild for child in children for grandchild in (child, *descendants(child))]


def lock_is_free(path: Path) -> bool:
    """Whether the run directory's lock is free again (a killed process's lock goes with it, once it is reaped)."""
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def held(tmp_path, moment: str, step: int) -> tuple[dict, object, object]:
    """(the environment that holds checkpoint `step` at `moment`, the mark file, the release file)."""
    mark, release = tmp_path / "held", tmp_path / "release"
    environ = env_with_sitecustomize(tmp_path / "site", HOLDS[moment])
    environ.update(HOLD_STEP=f"step_{step:08d}", HOLD_MARK=str(mark), HOLD_RELEASE=str(release))
    return environ, mark, release


@pytest.fixture(scope="module")
def reference(shakespeare_data, tmp_path_factory):
    """The uninterrupted runs' losses, on one process and on 2 FSDP ranks."""
    one, fsdp = (tmp_path_factory.mktemp(name) / "run" for name in ("one", "fsdp"))
    run(train_cmd(shakespeare_data, one, *ARGS))
    run(train_cmd(shakespeare_data, fsdp, *ARGS, "--strategy", "fsdp", nproc=2))
    return {1: losses(one), 2: losses(fsdp)}


@pytest.mark.parametrize(
    "moment, nproc", [("data written", 1), ("hashed", 1), ("meta written", 1), ("data written", 2), ("hashed", 2)]
)
def test_a_kill_during_a_background_save_leaves_nothing_that_looks_complete(
    moment, nproc, reference, shakespeare_data, tmp_path
):
    out = tmp_path / "run"
    environ, mark, _ = held(tmp_path, moment, 8)
    args = [*ARGS, *(["--strategy", "fsdp"] if nproc == 2 else [])]
    proc = subprocess.Popen(
        train_cmd(shakespeare_data, out, *args, nproc=nproc), env=environ, start_new_session=True, text=True
    )
    wait_for(mark.exists)  # step 8's save is held at `moment`, training past it
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun's workers too: they run in sessions of their own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not (out / ".lock").exists() or lock_is_free(out / ".lock"))
    # Retention kept step 4 (keep_ckpts 1) while step 8 was being written; step 8's is only temporary.
    assert [p.name for p in checkpoint.list_steps(out)] == ["step_00000004"]
    assert checkpoint.latest_valid(out, report=None) == out / "checkpoints" / "step_00000004"
    rerun = run(train_cmd(shakespeare_data, out, *args, nproc=nproc))
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'}" in rerun.stdout
    assert losses(out) == reference[nproc]  # bit for bit


def test_the_next_save_a_stop_and_the_end_wait_for_the_save_in_flight(reference, shakespeare_data, tmp_path):
    out = tmp_path / "run"
    environ, mark, release = held(tmp_path, "hashed", 4)
    args = ["--max_steps", 12, "--ckpt_interval", 4]
    proc = subprocess.Popen(train_cmd(shakespeare_data, out, *args), env=environ, stdout=subprocess.PIPE, text=True)
    wait_for(mark.exists)
    # Step 8's checkpoint must wait for step 4's: the run stays there (its step-8 record is flushed before).
    wait_for(lambda: any(r["step"] == 8 for r in metrics(out)) if logged_steps(out) else False)
    proc.send_signal(signal.SIGTERM)  # acted on after the next step, while step 8's is being written
    release.touch()
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    lines = stdout.splitlines()
    stopped = next(i for i, line in enumerate(lines) if "stopping on SIGTERM" in line)
    stop_step = int(lines[stopped].split(" at step ")[1].split(":")[0])
    assert 8 < stop_step < 12
    for step in (4, 8, stop_step):  # each committed, and said so, before the run said it stopped
        written = next((i for i, line in enumerate(lines) if f"ckpt of step {step} written" in line), None)
        assert written is not None, (step, stdout)
        assert written < stopped, step
    waited = next(r for r in metrics(out) if r.get("ckpt_step") == 4)["ckpt_wait_s"]
    assert waited > 0  # step 8's save waited for it
    assert [p.name for p in checkpoint.list_steps(out)] == [f"step_{s:08d}" for s in (4, 8, stop_step)]
    assert all(checkpoint.problem(p) is None for p in checkpoint.list_steps(out))

    # The end of the run waits too: the last checkpoint is held until the test lets it go.
    (tmp_path / "end").mkdir()
    environ, mark, release = held(tmp_path / "end", "hashed", 12)
    proc = subprocess.Popen(train_cmd(shakespeare_data, out, *args), env=environ, stdout=subprocess.PIPE, text=True)
    wait_for(mark.exists)
    release.touch()
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "ckpt of step 12 written" in stdout, stdout
    assert checkpoint.latest_valid(out, report=None) == out / "checkpoints" / "step_00000012"
    assert losses(out) == reference[1]
