import subprocess
import sys

import pytest

from tests.distributed.helpers import REPO, env_with_sitecustomize


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tunables are Linux-only")
def test_reexec_sets_malloc_tunables_and_keeps_the_pid(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import os\n"
        "print('start', os.getpid(), os.environ.get('MALLOC_MMAP_THRESHOLD_'), flush=True)\n"
        "from gpt2repro.runtime import keep_freed_memory_in_heap\n"
        "keep_freed_memory_in_heap()\n"
        "print('after', os.getpid(), os.environ['MALLOC_TRIM_THRESHOLD_'])\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-u", str(script), "x"], capture_output=True, text=True, env=env, check=True)
    lines = [line.split() for line in out.stdout.splitlines()]
    assert [line[0] for line in lines] == ["start", "start", "after"]  # ran once more, then went on
    assert lines[0][1] == lines[1][1] == lines[2][1]  # same process
    assert lines[0][2] == "None" and lines[1][2] == lines[2][2] == str(1 << 34)


def test_slurm_nodelist_expansion():
    from gpt2repro.slurm import expand_nodelist

    assert expand_nodelist("gpu[01-03,07],login1,n[8-10]") == [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu07",
        "login1",
        "n8",
        "n9",
        "n10",
    ]


def test_sbatch_dry_run_prints_one_torchrun_per_node():
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "4242",
        "GPUS_PER_NODE": "8",
    }
    out = subprocess.run(
        ["bash", str(repo / "launch/slurm/train.sbatch"), "--config", "gpt2-124m", "--data", "d", "--out", "r"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, node in zip(lines, ("gpu07", "gpu08"), strict=True):
        assert line.startswith(f"{node}: torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d ")
        assert "--rdzv-backend=c10d --rdzv-endpoint=gpu07:29500 --rdzv-id=4242" in line
        assert line.endswith("launch/train.py --config gpt2-124m --data d --out r")


def test_restart_store_warning(monkeypatch):
    from gpt2repro.distributed import check_restart_store

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert check_restart_store() is None  # one node: restarts work on the shared store
    monkeypatch.setenv("GROUP_WORLD_SIZE", "4")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in check_restart_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert check_restart_store() is None


# What pip reports for an older CUDA build of torch, in every process started with it on PYTHONPATH.
OLD_TORCH = """import importlib.metadata
_version = importlib.metadata.version
importlib.metadata.version = lambda name: "2.4.1+cu121" if name == "torch" else _version(name)
"""


@pytest.mark.parametrize("launcher", ["train.py", "eval.py", "sample.py", "export.py", "compare.py"])
def test_a_torch_older_than_the_floor_is_one_error_line_naming_the_fix(launcher, tmp_path):
    old = env_with_sitecustomize(tmp_path / "old_torch", OLD_TORCH)
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / launcher), "--help"], capture_output=True, text=True, env=old
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: gpt2repro needs torch 2.9 or newer, and this is torch 2.4.1+cu121; install a newer build: "
        "pip install 'torch>=2.9' (on a GPU machine, the build for your CUDA version from pytorch.org)."
    ]


def test_the_floor_admits_what_the_package_needs_and_pyproject_declares_it():
    from gpt2repro.runtime import TORCH_FLOOR, torch_too_old

    assert torch_too_old("2.8.1+cu128") and torch_too_old("2.4.1")
    assert not torch_too_old("2.9.0") and not torch_too_old("2.13.0+cpu") and not torch_too_old("2.10.0a0+git1234")
    assert not torch_too_old()  # the torch this suite runs on
    import torch.optim._muon  # noqa: F401  what the floor is for (2.9), importable here

    declared = (REPO / "pyproject.toml").read_text()
    assert f'"torch>={".".join(map(str, TORCH_FLOOR))}"' in declared
