import subprocess
import sys

import pytest


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
        "gpu01", "gpu02", "gpu03", "gpu07", "login1", "n8", "n9", "n10",
    ]  # fmt: skip


def test_sbatch_dry_run_prints_one_torchrun_per_node():
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242",
           "GPUS_PER_NODE": "8"}  # fmt: skip
    out = subprocess.run(["bash", str(repo / "launch/slurm/train.sbatch"), "--config", "gpt2-124m", "--data", "d",
                          "--out", "r"], env=env, capture_output=True, text=True, check=True)  # fmt: skip
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
