"""The compile survives a resume: a compiled run keeps Inductor's cache in RUN_DIR/compile_cache, and the next
launch loads every graph and kernel from it instead of compiling again; a launch for another program empties it
and says why. Each launch records its start-up in parts."""

import pytest

from gpt2repro.metrics import STARTUP_PARTS
from tests.distributed.helpers import metrics, run, train_cmd

pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier

COMPILED = ["--compile", "true", "--ckpt_interval", 2, "--eval_interval", 2]


def cached_files(cache) -> set:
    """What Inductor keeps: its graphs (fxgraph/, aotautograd/) and kernels (the rest); not its lock files."""
    return {p.relative_to(cache) for p in cache.rglob("*") if p.is_file() and "locks" not in p.parts}


def startups(run_dir) -> list[dict]:
    return [r for r in metrics(run_dir) if "startup_s" in r]


def test_a_resumed_compiled_run_compiles_nothing_again(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    cache = out / "compile_cache"
    cold = run(train_cmd(shakespeare_data, out, *COMPILED, "--max_steps", 2))
    assert f"compile cache: {cache} (new: this launch compiles" in cold.stdout
    compiled = cached_files(cache)
    assert any(p.parts[0] == "fxgraph" for p in compiled), compiled  # training's and evaluation's graphs

    warm = run(train_cmd(shakespeare_data, out, *COMPILED, "--max_steps", 4))
    assert "resumed from" in warm.stdout
    assert f"compile cache: {cache} (kept from an earlier launch" in warm.stdout
    assert cached_files(cache) == compiled  # every graph and kernel of the train step and the eval came from it

    # Each launch's start-up, in its parts; they add up to the whole (from the process's start).
    first, second = startups(out)
    assert (first["step"], second["step"]) == (1, 3)
    for record in (first, second):
        parts = [record[f"startup_{part}_s"] for part in STARTUP_PARTS]
        assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(record["startup_s"], rel=1e-6)
    assert "start-up " in warm.stdout.split("step      3/4 | loss")[0]

    # Another program (the micro-batch halved, accumulation doubled: the same run) compiles afresh, saying why.
    other = run(
        train_cmd(shakespeare_data, out, *COMPILED, "--max_steps", 6, "--batch_size", 2, "--grad_accum_steps", 2)
    )
    assert f"compile cache: {cache} was made for another program (batch_size 4 -> 2" in other.stdout
    assert "compiling afresh" in other.stdout
