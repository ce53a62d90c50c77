"""Bad input to launch/train.py: one clear line on stderr, non-zero exit, nothing overwritten."""

import os
import signal
import socket
import subprocess

import numpy as np
import pytest

from gpt2repro import shards
from tests.distributed.helpers import (
    REPO,
    SLOW_STEPS,
    env_with_sitecustomize,
    logged_steps,
    losses,
    run,
    train_cmd,
    wait_for,
)

pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished_run(shakespeare_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run(train_cmd(shakespeare_data, out, "--max_steps", 2, "--ckpt_interval", 2))
    return out


def test_data_dir_without_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run(train_cmd(tmp_path / "empty", tmp_path / "out", "--max_steps", 2), check=False)
    assert_one_line_error(proc, "holds no token shards", "prepare.py")


def test_block_size_longer_than_every_shard(tmp_path):
    data = tmp_path / "short"
    data.mkdir()
    shards.write_shard(data / "d_train_000000.bin", np.arange(20))
    shards.write_shard(data / "d_val_000000.bin", np.arange(20))
    proc = run(train_cmd(data, tmp_path / "out", "--max_steps", 2), check=False)
    assert_one_line_error(proc, "block_size 32 is longer than every train shard")


def test_fsdp_without_torchrun(shakespeare_data, tmp_path):
    proc = run(train_cmd(shakespeare_data, tmp_path / "out", "--strategy", "fsdp"), check=False)
    assert_one_line_error(proc, "--strategy fsdp", "torchrun")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_fp8_without_an_fp8_gpu(shakespeare_data, tmp_path):
    proc = run(train_cmd(shakespeare_data, tmp_path / "out", "--fp8", "true"), check=False)
    assert_one_line_error(proc, "--fp8 true needs an NVIDIA GPU with FP8 tensor cores", "this is a CPU")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_checkpoint_of_another_model_shape(finished_run, shakespeare_data, tmp_path):
    ckpt = finished_run / "checkpoints" / "step_00000002"
    proc = run(train_cmd(shakespeare_data, tmp_path / "out", "--n_layer", 3, "--resume", ckpt), check=False)
    assert_one_line_error(proc, "another model shape", "n_layer=2 (checkpoint) vs 3 (config)")


def test_run_dir_of_another_run_is_not_overwritten(finished_run, shakespeare_data):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    proc = run(train_cmd(shakespeare_data, finished_run, "--max_steps", 2, "--n_embd", 64), check=False)
    assert_one_line_error(proc, "holds a different run", "n_embd: 32 -> 64")
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before


def test_non_finite_loss_stops_naming_the_last_good_checkpoint(finished_run, shakespeare_data, tmp_path):
    good = finished_run / "checkpoints" / "step_00000002"
    out = tmp_path / "nan"  # from a good checkpoint, an lr that ruins the weights at the first update
    args = [
        "--max_steps",
        30,
        "--lr",
        "1e38",
        "--min_lr",
        0,
        "--warmup_steps",
        0,
        "--ckpt_interval",
        1,
        "--keep_ckpts",
        1,
        "--max_nonfinite_steps",
        3,
        "--resume",
        good,
    ]
    proc = run(train_cmd(shakespeare_data, out, *args), check=False)
    # Step 3's loss (the weights of step 2) is finite; update 3 makes steps 4-6 non-finite.
    assert_one_line_error(proc, "3 consecutive steps had a non-finite loss (step 6)", f"last good checkpoint is {good}")
    assert losses(out) == {3: pytest.approx(losses(out)[3]), 4: None, 5: None}  # non-finite: null, not NaN
    assert (out / "metrics.jsonl").read_text().count("null") >= 2 and "NaN" not in (out / "metrics.jsonl").read_text()


def test_retention_never_deletes_the_last_good_checkpoint(shakespeare_data, tmp_path):
    out = tmp_path / "retention"
    # (The spike guard off: with it on, retention also keeps what a rollback may need, the last 32 steps'.)
    run(
        train_cmd(shakespeare_data, out, "--max_steps", 4, "--ckpt_interval", 1, "--keep_ckpts", 1, "--spike_zscore", 0)
    )
    steps = [p.name for p in (out / "checkpoints").iterdir()]
    # Step 4's loss vouches for the weights of step 3, not (yet) for those of step 4: both are kept.
    assert sorted(steps) == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--n_layr", "3"], ["unknown field --n_layr", "did you mean --n_layer?"]),
        (["--batch_size", "0", "--dtype", "fp8"], ["batch_size must be at least 1", "dtype must be one of"]),
        (["--total_batch_tokens", "1000"], ["total_batch_tokens 1000 is not divisible"]),
        (["--compile", "maybe", "--max_steps", "x"], ["--max_steps takes an integer"]),
    ],
)
def test_bad_fields_are_all_reported_at_once(shakespeare_data, tmp_path, args, fragments):
    proc = run(train_cmd(shakespeare_data, tmp_path / "out", *args), check=False)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "out").exists()


def test_sample_from_a_run_is_reproducible(finished_run):
    import sys

    cmd = [
        sys.executable,
        str(REPO / "launch" / "sample.py"),
        "--ckpt",
        str(finished_run),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "12",
        "--seed",
        "7",
    ]
    first, second = run(cmd), run(cmd)
    assert first.stdout == second.stdout and first.stdout.count("ROMEO:") == 1
    other = run([*cmd[:-1], "8"])
    assert other.stdout != first.stdout


def test_sample_from_a_directory_without_checkpoints(tmp_path):
    import sys

    proc = run([sys.executable, str(REPO / "launch" / "sample.py"), "--ckpt", str(tmp_path)], check=False)
    assert_one_line_error(proc, "neither a checkpoint nor a run directory")


def test_bad_paths_are_one_clear_line(finished_run, shakespeare_data, tmp_path):
    import sys

    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"not a model")
    cases = [
        (train_cmd(shakespeare_data, a_file), "--out", "is a file"),
        (train_cmd(shakespeare_data, a_file / "run"), "--out", "lies under a file"),
        (train_cmd(a_file, tmp_path / "out"), "Data directory", "is a file"),
        (train_cmd(shakespeare_data, tmp_path / "out", "--resume", tmp_path / "nope"), "nope does not exist"),
        (
            [sys.executable, str(REPO / "launch" / "eval.py"), "--ckpt", str(a_file), "--data", str(shakespeare_data)],
            "is neither a model file written by launch/export.py nor an llm.c model file",
        ),
        (
            [
                sys.executable,
                str(REPO / "launch" / "sample.py"),
                "--ckpt",
                str(finished_run),
                "--prompt-file",
                str(tmp_path / "nope.txt"),
            ],
            "--prompt_file",
            "No such file",
        ),
    ]
    for cmd, *fragments in cases:
        assert_one_line_error(run(cmd, check=False), *fragments)
    assert a_file.read_bytes() == b"not a model" and not (tmp_path / "out" / "checkpoints").exists()


def test_a_second_launch_into_a_run_directory_in_use_is_refused(shakespeare_data, tmp_path):
    """Two launches in one --out would delete each other's checkpoints in the making: the second is refused while
    the first lives, and a kill -9 of the first frees the directory (the kernel drops its lock)."""
    out = tmp_path / "run"
    slow = env_with_sitecustomize(tmp_path / "slow", SLOW_STEPS)
    first = subprocess.Popen(train_cmd(shakespeare_data, out, "--max_steps", 1000), env=slow, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: logged_steps(out) >= 1)
        second = run(train_cmd(shakespeare_data, out, "--max_steps", 1000), check=False)
        assert_one_line_error(
            second,
            f"{out} is in use by another launch (pid {first.pid} on {socket.gethostname()})",
            "stop it first (under torchrun, its workers too), or use another --out",
        )
        assert first.poll() is None  # the first goes on
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert run(train_cmd(shakespeare_data, out, "--max_steps", 3)).returncode == 0
