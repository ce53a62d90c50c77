"""The loss-spike guard, with its defaults (no guard flag), against real faults: stretches of training batches
of random tokens written into the shards at the batches some steps read (the data order is a pure function of
seed and step), placed where a guard is weakest: right after the warmup, inside its first window, mid-run,
longer than --rollback_after, with a checkpoint every 10 steps and the default retention, under float16, on
two ranks with the poison in one rank's rows only, and killed -9 after a rollback. Each run ends within 1% of
the clean run's final val loss, having skipped exactly the poisoned batches it read; a healthy run is bitwise
the same with the guard on (the default) as with it off."""

import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.spike_guard import poison
from gpt2repro import compare
from gpt2repro.checkpoint import read_trainer
from gpt2repro.config import TrainConfig
from tests.distributed.helpers import env, env_with_sitecustomize, losses, metrics, slowed, train_cmd, wait_for

RUN = [
    "--max_steps",
    300,
    "--warmup_steps",
    60,
    "--lr",
    2e-3,
    "--log_interval",
    10,
    "--eval_interval",
    300,
    "--eval_tokens",
    4096,
    "--ckpt_interval",
    50,
]
# (At lr 4e-3 this tiny model's runs are chaotic: leaving out 30 clean batches moved the final val by 1.7%; at
# 2e-3 by 0.15%, so that 1% tells a guarded run from one that learned the poison.)
GUARD_OFF = ["--spike_zscore", 0]
MID, AFTER_WARMUP, FIRST_WINDOW = range(200, 230), range(61, 91), range(136, 166)
LONG = range(200, 260)  # longer than --rollback_after (32): skipping alone is not enough
FREQUENT = range(200, 241)

CASES = {  # name: (poisoned batches, extra flags, launch)
    "clean": (range(0), [], 1),
    "clean_guard_off": (range(0), GUARD_OFF, 1),
    "mid_guard_off": (MID, GUARD_OFF, 1),
    "mid": (MID, [], 1),
    "after_warmup": (AFTER_WARMUP, [], 1),
    "first_window": (FIRST_WINDOW, [], 1),
    "long": (LONG, [], 1),
    "frequent_ckpts": (FREQUENT, ["--ckpt_interval", 10], 1),
    "clean_float16": (range(0), ["--dtype", "float16"], 1),  # float16's own clean run: another path than float32's
    "float16": (MID, ["--dtype", "float16"], 1),
    # Two ranks of 4 rows, rank 0's poisoned, and their clean run: half the global batch poisoned shifts its loss
    # by half as much, against noise sqrt(2) times smaller than 4 rows' (whose z-scores, around 9, straddle 8).
    "two_ranks_clean": (range(0), ["--batch_size", 4], 2),
    "two_ranks_one_poisoned": (MID, ["--batch_size", 4], 2),
}


pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    """Every case, one process each (as many at a time as there are cores: more only thrash), and the long stretch
    again, killed -9 right after its rollback and then resumed, and the mid stretch stopped by SIGTERM in its
    streak and resumed. Their run directories, by name."""
    root = tmp_path_factory.mktemp("spikes")
    data = {}
    for batches in {MID, AFTER_WARMUP, FIRST_WINDOW, LONG, FREQUENT}:
        data[batches] = poison(shakespeare_data, root / f"data_{batches.start}_{batches.stop}", batches, 4, 32)
    data[range(0)] = shakespeare_data
    two_ranks = poison(shakespeare_data, root / "data_two_ranks", MID, 4, 32, world_size=2, ranks=[0])
    # Each step of the interrupted runs a little slower, so that the signal lands well before the end on any machine.
    slow = env_with_sitecustomize(root / "site", slowed("gpt2repro.train", "train_step", 0.02))

    def case(name, batches, flags, nproc):
        source = two_ranks if name == "two_ranks_one_poisoned" else data[batches]
        _finish(_start(train_cmd(source, root / name, *RUN, *flags, nproc=nproc), root / f"{name}.log"), name, root)

    def killed():
        cmd = train_cmd(data[LONG], root / "killed", *RUN)
        proc = _start(cmd, root / "killed.log", slow)
        log = root / "killed" / "metrics.jsonl"
        wait_for(lambda: log.exists() and "rollback_from" in log.read_text(), timeout=600)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert metrics(root / "killed")[-1]["step"] < 300
        _finish(_start(cmd, root / "resumed.log"), "resumed", root)

    def stopped():  # SIGTERM in the middle of a streak (its 5th skipped batch): a checkpoint of the last step
        cmd = train_cmd(data[MID], root / "stopped", *RUN)
        proc = _start(cmd, root / "stopped.log", slow)
        log = root / "stopped" / "metrics.jsonl"
        wait_for(lambda: log.exists() and log.read_text().count("spike_loss") >= 5, timeout=600)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (root / "stopped.log").read_text()[-3000:]
        _finish(_start(cmd, root / "stopped_resumed.log"), "stopped_resumed", root)

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        jobs = [pool.submit(killed), pool.submit(stopped)]
        jobs += [pool.submit(case, name, *spec) for name, spec in CASES.items()]
        for job in jobs:
            job.result()
    return {name: root / name for name in [*CASES, "killed", "stopped"]}


def _finish(proc, name, root):
    assert proc.wait(timeout=900) == 0, f"{name}: {(root / f'{name}.log').read_text()[-3000:]}"


def _start(cmd, log, environ=None):
    """cmd started, its output to the file log (pipes left unread could fill and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=environ or env(), stdout=out, stderr=subprocess.STDOUT)


def rollbacks(run_dir) -> list[tuple[int, int, int]]:
    """(step rolled back to, step it left, data offset) of each rollback record, in order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["rollback_from"], r["data_offset"]) for r in records if "rollback_from" in r]


def final_val(run_dir) -> float:
    return [r["val_loss"] for r in metrics(run_dir) if "val_loss" in r][-1]


def spikes(run_dir) -> int:
    return [r["spikes"] for r in metrics(run_dir) if "spikes" in r][-1]


def within_1_percent_of_clean(runs, name) -> bool:
    """Within 1% of the clean run of the same precision and layout."""
    clean = {"float16": "clean_float16", "two_ranks_one_poisoned": "two_ranks_clean"}.get(name, "clean")
    clean, val = final_val(runs[clean]), final_val(runs[name])
    assert abs(val - clean) / clean < 0.01, (name, val, clean)
    return True


def test_the_guard_is_on_by_default():
    assert TrainConfig().spike_zscore > 0


def test_a_healthy_run_is_bitwise_the_same_with_the_guard_on(runs):
    assert losses(runs["clean"]) == losses(runs["clean_guard_off"])
    logged = [r for r in metrics(runs["clean"]) if "spikes" in r]
    assert len(logged) == 30 and all(r["spikes"] == 0 for r in logged)
    # Judged after the warmup; the largest z-score under the default threshold.
    assert all(r["max_z"] == 0 for r in logged[:6])
    assert 0 < max(r["max_z"] for r in logged) < TrainConfig().spike_zscore


@pytest.mark.parametrize(
    "name, poisoned",
    [
        ("mid", MID),
        ("after_warmup", AFTER_WARMUP),
        ("first_window", FIRST_WINDOW),
        ("float16", MID),
        ("two_ranks_one_poisoned", MID),
    ],
)
def test_a_poisoned_stretch_is_skipped_exactly_and_the_run_ends_where_the_clean_one_does(runs, name, poisoned):
    by_step = {r["step"]: r for r in metrics(runs[name]) if "spikes" in r}
    before = poisoned.start - 1 - (poisoned.start - 1) % 10  # the log step before the stretch
    assert by_step[before]["spikes"] == 0 and spikes(runs[name]) == len(poisoned)  # those steps, no others
    assert not rollbacks(runs[name])
    assert within_1_percent_of_clean(runs, name)


def test_unguarded_the_stretch_is_learned(runs):
    """Without the guard the model learns the random tokens (towards the unigram's loss on them); guarded, it
    never trains on them: each skipped batch is logged with the loss it had. (How much worse the unguarded run
    ends is benchmarks/spike_guard.py's table: in this tiny model, 0.6%.)"""
    seen = {r["batch"]: r["spike_loss"] for r in skipped(runs["mid"])}
    assert sorted(seen) == list(MID)
    unguarded = losses(runs["mid_guard_off"])
    assert seen[200] == unguarded[200] > 12  # the stretch's first batch, before any update on it: bitwise the same
    assert unguarded[220] < seen[220] - 1


def skipped(run_dir, name="metrics.jsonl") -> list[dict]:
    """The records of the updates the guard skipped."""
    return [r for r in map(json.loads, (run_dir / name).read_text().splitlines()) if "spike_loss" in r]


def test_under_float16_the_skips_leave_the_loss_scale_alone(runs):
    """30 skipped spikes would have halved the scale 30 times (2^16 -> 2^-14)."""
    final = read_trainer(sorted((runs["float16"] / "checkpoints").glob("step_*"))[-1])
    assert final["scaler"]["scale"] >= 2.0**10, final["scaler"]


def test_a_stretch_longer_than_rollback_after_rolls_back_once_and_skips_the_rest(runs):
    """Step 200 meets the stretch: batches 200-231 are skipped in turn (the step is taken again each time), and
    at the 32nd the rollback is due: back to checkpoint 150 with the data 81 batches on (step 151 reads batch
    232). The window at 150 is the run's own and judges at once: the stretch's other 28 batches are skipped."""
    run_dir = runs["long"]
    assert rollbacks(run_dir) == [(150, 200, 81)]
    assert spikes(run_dir) == len(LONG) and metrics(run_dir)[-1]["step"] == 300
    assert [e["rollback_from"] for e in compare.read_run(run_dir).events] == [200]  # marked on compare's plot
    # The evidence kept: what the rollback took back (the logged steps 160-190 and the 32 skipped batches), set
    # aside; the batches skipped after it, where they happened.
    taken_back = [r["step"] for r in compare.read_run(run_dir).rolled_back]
    assert taken_back == list(range(160, 191, 10))
    assert [r["batch"] for r in skipped(run_dir, "metrics.rolled_back.jsonl")] == list(range(200, 232))
    assert [(r["step"], r["batch"]) for r in skipped(run_dir)] == [(151, b) for b in range(232, 260)]
    assert within_1_percent_of_clean(runs, "long")


def test_the_rollback_finds_its_checkpoint_with_frequent_checkpoints_and_the_default_retention(runs):
    """Checkpoints every 10 steps, the newest 3 kept: the rollback goes back at least rollback_after (32) steps
    before the streak (to 160, where the updates just before it, which may have done the damage, are undone),
    and retention has kept that one."""
    run_dir = runs["frequent_ckpts"]
    assert rollbacks(run_dir) == [(160, 200, 71)]
    assert spikes(run_dir) == len(FREQUENT) and within_1_percent_of_clean(runs, "frequent_ckpts")


def test_a_kill_after_a_rollback_resumes_in_the_same_order(runs):
    assert losses(runs["killed"]) == losses(runs["long"])  # bitwise: the same data order and decisions
    assert rollbacks(runs["killed"]) == rollbacks(runs["long"])


def test_a_stop_in_the_middle_of_a_streak_checkpoints_at_once_and_resumes_in_the_same_order(runs):
    """SIGTERM at the 5th of 30 skipped batches: a checkpoint of step 199 with the data past them, not after the
    streak; the resume skips the other 25 and ends as the uninterrupted run, its evidence whole."""
    stopped = runs["stopped"]
    assert "stopping on SIGTERM at step 199" in (stopped.parent / "stopped.log").read_text()
    assert losses(stopped) == losses(runs["mid"])
    assert [r["batch"] for r in skipped(stopped)] == list(MID)
