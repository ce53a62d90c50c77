"""Run launch/train.py for real: as one process, under torchrun, or as two torchrun agents."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "launch" / "train.py")
# A model small enough that a step takes tens of milliseconds on a 2-core CPU.
TINY = [
    "--config",
    "shakespeare-cpu",
    "--n_layer",
    "2",
    "--n_head",
    "2",
    "--n_embd",
    "32",
    "--block_size",
    "32",
    "--batch_size",
    "4",
    "--eval_tokens",
    "512",
    "--warmup_steps",
    "2",
    "--log_interval",
    "1",
    "--eval_interval",
    "1000",
    "--ckpt_interval",
    "1000",
    "--device",
    "cpu",
]


def env(fresh_rendezvous_store: bool = False) -> dict:
    """The environment of every launch; fresh_rendezvous_store as README asks of multi-node torchrun
    with restarts (distributed.RESTART_FIX). Without it, torchrun shares its store: its default."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    e.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    e.pop("TORCHINDUCTOR_CACHE_DIR", None)  # set in this process by Inductor or by an in-process run: not the user's
    if fresh_rendezvous_store:
        e["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return e


def env_with_sitecustomize(directory: Path, *codes: str, fresh_rendezvous_store: bool = False) -> dict:
    """env() where every Python process (torchrun's agents, its workers, a Slurm job's tasks) first runs
    `codes`, as the sitecustomize.py it imports from directory (put on PYTHONPATH, before this checkout, so
    that scripts outside launch/ import this checkout's package whatever is installed)."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text("\n".join(codes))
    return {**env(fresh_rendezvous_store), "PYTHONPATH": os.pathsep.join([str(directory), str(REPO)])}


# sitecustomize code: runs PATCH with `module` bound to MODULE, right after MODULE is first imported
# (before any `from MODULE import name` elsewhere binds the old name).
_AFTER_IMPORT = """import importlib.abc, importlib.util, sys
class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != {module!r}:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module
        def exec_module(module):
            run_module(module)
            exec({patch!r}, {{"module": module}})
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _Patch())
"""


def after_import(module: str, patch: str) -> str:
    """sitecustomize code that runs `patch` (Python, with `module` bound) once `module` has been imported."""
    return _AFTER_IMPORT.format(module=module, patch=patch)


def slowed(module: str, function: str, seconds: float) -> str:
    """sitecustomize code that makes module.function sleep `seconds` before it runs, on every rank: a premise
    (a slow eval, slow steps) forced, whatever the machine's speed."""
    patch = f"""import functools, time
_original = module.{function}
@functools.wraps(_original)
def _slowed(*args, **kwargs):
    time.sleep({seconds!r})
    return _original(*args, **kwargs)
module.{function} = _slowed
"""
    return after_import(module, patch)


def hold_before_quorum(path: Path, group: int) -> str:
    """sitecustomize code: fault tolerance's replica group `group` waits before each step's quorum while `path`
    exists (the lighthouse still counts it: its manager heartbeats from a thread of its own). A group restarted
    meanwhile is then sure to find it alive, however long its restart takes."""
    patch = f"""import os, time
_join = module.Replicas.join
def _held(self, state):
    while self.cfg.ft_group == {group!r} and os.path.exists({str(path)!r}):
        time.sleep(0.05)
    return _join(self, state)
module.Replicas.join = _held
"""
    return after_import("gpt2repro.ft", patch)


# A training step of at least this long: whatever a test does between two steps (read a file, send a
# signal) lands before the run ends, on a fast machine too.
SLOW_STEP_S = 0.5
SLOW_STEPS = slowed("gpt2repro.train", "train_step", SLOW_STEP_S)


def free_port() -> int:
    """A free port for a rendezvous that several agents must agree on. It is picked below the
    kernel's ephemeral range (32768 and up), so that no outgoing connection or port-0 bind can
    take it between this check and the agent's bind."""
    rng = random.Random(os.getpid())
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 20000-32000")


def train_cmd(data: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    args = ["--data", str(data), "--out", str(out), *TINY, *map(str, extra)]
    if nproc == 1:
        return [sys.executable, TRAIN, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]


def run(cmd: list[str], check: bool = True, timeout: float = 300, environ: dict | None = None):
    """cmd's completed process, in env() (or `environ`); check: it must have exited 0."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ or env(), timeout=timeout)
    if check:
        # The first errors too: under torchrun the rank that failed first is often far above the tail.
        errors = "\n".join([line for line in proc.stderr.splitlines() if "Error" in line][:5])
        assert proc.returncode == 0, f"exit {proc.returncode}\n{errors}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one dict per step: a checkpoint's own record ({step, tokens, ckpt_s}) merged into its step's."""
    merged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(record["step"], {}).update(record)
    return list(merged.values())


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def logged_steps(run_dir: Path) -> int:
    """Lines in metrics.jsonl so far (0 before it exists)."""
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(predicate, timeout: float = 120) -> None:
    """Poll until predicate() holds; fail the test after timeout seconds."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.02)
