"""benchmarks/gpu_check.sh --smoke: every stage of the prepared GPU check, at toy sizes, on this CPU,
as on a bare GPU image: only torch, numpy and tiktoken importable. A benchmark row that breaks
leaves the other rows standing, and a benchmark run that is cut keeps the rows it measured."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.helpers import REPO, after_import, env_with_sitecustomize
from tests.unit.test_gpu_check_parts import gpu_check

# Imported first by every Python process started with it on PYTHONPATH: these packages then fail to import.
MISSING = ["tqdm", "datasets", "pyarrow", "wandb", "transformers", "safetensors", "matplotlib", "torchao"]
BARE_IMAGE = f"import sys; sys.modules.update(dict.fromkeys({MISSING!r}))\n"


pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier


def test_gpu_check_smoke_runs_every_stage(tmp_path):
    bare = env_with_sitecustomize(tmp_path / "bare", BARE_IMAGE)
    work = tmp_path / "work"
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bare, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = proc.stdout
    stages = [line.split()[0] for line in table.splitlines()[1:] if line[:1].strip()]
    # The figures first: what a cut call on a lent GPU must bring back (gpu_check.py's docstring).
    assert stages == ["data", "speed", "memory", "oom", "train", "profile", "resume", "eval", "tune"], table
    assert "FAILED" not in table
    assert "plain" in table and "ours" in table and "fp8 skipped (--fp8 true needs an NVIDIA GPU" in table
    assert "muon" in table and "toy b4 muon: planned" in table
    assert "step 31, step 32 traced:" in table
    assert "resumed from step 40, steps up to 60" in table
    assert "(--batch_size 8 --compile false) equals the logged" in table
    assert "error: out of host memory" in table
    assert "fastest that fits: ddp micro" in table and "forecast for this launch (1 rank(s)" in table
    assert (work / "run" / "checkpoints" / "step_00000060").is_dir()


# The fused loss's CUDA branch forced on: on a CPU its torch.mm(out_dtype=float32) raises, as a broken kernel would.
BROKEN_FUSED_ROW = after_import("gpt2repro.loss", "module._has_fp32_output_gemm = lambda t: True\n")


def test_a_benchmark_row_that_breaks_is_reported_and_the_others_still_run(tmp_path):
    broken = env_with_sitecustomize(tmp_path / "broken", BROKEN_FUSED_ROW)
    rows = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "train_throughput.py"),
        "--n_layer",
        "1",
        "--n_head",
        "2",
        "--n_embd",
        "32",
        "--block_size",
        "32",
        "--batch_size",
        "2",
        "--dtype",
        "bfloat16",
        "--compile",
        "false",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--rows",
        "plain,fused,unfused",
        "--json",
        str(rows),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=broken, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in json.loads(rows.read_text())}
    assert results["fused"]["failed"].startswith("NotImplementedError: Could not run 'aten::mm.dtype'")
    assert results["fused"]["tokens_per_s"] == 0
    assert results["plain"]["tokens_per_s"] > 0 and results["unfused"]["tokens_per_s"] > 0
    assert "fused    FAILED: NotImplementedError" in proc.stdout


# The benchmark's second row never starts measuring (as a slow compile): the run is cut, by the check's
# budget, after its first row. HUNG_PID names the process that hung.
SECOND_ROW_HANGS = """import os, time
_build_engine, _built = module.build_engine, []
def build_engine(*args, **kwargs):
    _built.append(1)
    if len(_built) == 2:
        with open(os.environ["HUNG_PID"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    return _build_engine(*args, **kwargs)
module.build_engine = build_engine
"""
CUT_AFTER_S = 60  # the check's budget here: ample for one toy row on a busy 2-core CPU


def test_a_cut_benchmark_run_shows_the_rows_it_measured_and_leaves_no_worker(tmp_path, monkeypatch):
    environ = env_with_sitecustomize(tmp_path / "hang", after_import("gpt2repro.engine", SECOND_ROW_HANGS))
    hung_pid = tmp_path / "hung.pid"
    for name in ("PYTHONPATH", "OMP_NUM_THREADS", "PYTHONUNBUFFERED"):  # for gpu_check's torchrun
        monkeypatch.setenv(name, environ[name])
    monkeypatch.setenv("HUNG_PID", str(hung_pid))
    toy = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "2"]
    sizes = dataclasses.replace(gpu_check.SMOKE, speed=[("toy b2", toy, "plain,unfused,fused")], memory=[])
    work = tmp_path / "work"
    work.mkdir()

    speed, memory = gpu_check.speed_and_memory(sizes, work, set(), gpu_check.Budget(CUT_AFTER_S))

    assert not speed.ok, speed.lines
    row, cut = speed.lines
    assert row.startswith("toy b2: plain ") and " tok/s | unfused CUT " in row and "| fused CUT " in row, row
    assert cut.startswith("toy b2: run cut, 1 of 3 rows measured: FAILED (exit 124): killed after 60 s"), cut
    assert any(line.startswith("toy b2 plain: planned ") for line in memory.lines), memory.lines
    # Stopped with torchrun, not left behind (on a GPU it would hold the memory of the stages after it).
    pid = int(hung_pid.read_text())
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())
