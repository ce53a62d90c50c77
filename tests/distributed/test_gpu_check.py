"""benchmarks/gpu_check.sh --smoke: every stage of the prepared GPU check, at toy sizes, on this CPU,
as on a bare GPU image: only torch, numpy and tiktoken importable. And a benchmark row that breaks
leaves the other rows standing."""

import json
import subprocess
import sys

from tests.distributed.helpers import REPO, after_import, env_with_sitecustomize

# Imported first by every Python process started with it on PYTHONPATH: these packages then fail to import.
MISSING = ["tqdm", "datasets", "pyarrow", "wandb", "transformers", "safetensors", "matplotlib", "torchao"]
BARE_IMAGE = f"import sys; sys.modules.update(dict.fromkeys({MISSING!r}))\n"


def test_gpu_check_smoke_runs_every_stage(tmp_path):
    bare = env_with_sitecustomize(tmp_path / "bare", BARE_IMAGE)
    work = tmp_path / "work"
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bare, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = proc.stdout
    stages = [line.split()[0] for line in table.splitlines()[1:] if line[:1].strip()]
    assert stages == ["data", "train", "profile", "resume", "eval", "oom", "tune", "speed", "memory"], table
    assert "FAILED" not in table
    assert "plain" in table and "ours" in table and "fp8 skipped (--fp8 true needs an NVIDIA GPU" in table
    assert "muon" in table and "toy b4 muon: planned" in table
    assert "step 31, step 32 traced:" in table
    assert "resumed from step 40, steps up to 60" in table
    assert "(--batch-size 8 --compile false) equals the logged" in table
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
