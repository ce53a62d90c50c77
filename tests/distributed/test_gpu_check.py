"""benchmarks/gpu_check.sh --smoke: every stage of the prepared GPU check, at toy sizes, on this CPU,
as on a bare GPU image: only torch, numpy and tiktoken importable."""

import subprocess

from tests.distributed.helpers import REPO, env_with_sitecustomize

# Imported first by every Python process started with it on PYTHONPATH: these packages then fail to import.
MISSING = ["tqdm", "datasets", "pyarrow", "wandb", "transformers", "safetensors", "matplotlib", "torchao"]
BARE_IMAGE = f"import sys; sys.modules.update(dict.fromkeys({MISSING!r}))\n"


def test_gpu_check_smoke_runs_every_stage(tmp_path):
    bare = env_with_sitecustomize(tmp_path / "bare", BARE_IMAGE)
    work = tmp_path / "work"
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bare, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = proc.stdout
    stages = [line.split()[0] for line in table.splitlines()[1:] if line[:1].strip()]
    assert stages == ["data", "speed", "memory", "train", "resume", "eval"], table
    assert "FAILED" not in table
    assert "plain" in table and "ours" in table and "fp8 skipped (--fp8 true needs an NVIDIA GPU" in table
    assert "resumed from step 40, steps up to 60" in table
    assert "equals the logged" in table
    assert (work / "run" / "checkpoints" / "step_00000060").is_dir()
