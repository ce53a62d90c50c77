"""torch.compile's work kept with the run: Inductor's cache directory is RUN_DIR/compile_cache, so that a
resumed or requeued run, on this node or another, loads the graphs and kernels it compiled before instead of
compiling them again (a cold GPT-2 compile takes minutes on a GPU).

Inductor keys each cached graph and kernel by its content, so a stale entry is never used, only kept. The
directory's fingerprint.json names what it was made for: the torch version, the device, the world size and
the settled fields that shape the compiled program; a launch whose fingerprint differs empties it first and
says why in one line. Every rank shares the one directory, as the ranks of a node share Inductor's default
one (its writes are atomic renames). A TORCHINDUCTOR_CACHE_DIR set in the environment is the user's choice
and is left as it is.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from gpt2repro import config as C
from gpt2repro import distributed as D
from gpt2repro import rundir
from gpt2repro.schema import to_json
from gpt2repro.shards import write_json_atomic

FINGERPRINT = "fingerprint.json"
ENV = "TORCHINDUCTOR_CACHE_DIR"
# Resumable fields that still change what is compiled (the others, logging and intervals, never reach a graph).
_ours = ""  # the directory this process pointed Inductor at (a later run in the same process may move it)
PROGRAM_FIELDS = ("batch_size", "activation_checkpointing", "fused_loss", "fp8", "strategy", "compile")


def fingerprint(cfg: C.TrainConfig, info: D.DistInfo) -> dict:
    """What a compile cache was made for: torch, the device, the world size and the fields that shape the
    program (every field a run may not change on resume, and the resumable ones of PROGRAM_FIELDS)."""
    if info.device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(info.device)
        device = f"{torch.cuda.get_device_name(info.device)} (sm_{major}{minor})"
    else:
        device = f"cpu {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    fields = to_json(cfg)
    program = {f: fields[f] for f in C.FIELDS if f not in C.RESUMABLE or f in PROGRAM_FIELDS}
    return {"torch": torch.__version__, "device": device, "world_size": info.world_size, "config": program}


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two fingerprints, as "name old -> new"."""
    changed = [
        f"{key} {old.get(key)} -> {new[key]}" for key in ("torch", "device", "world_size") if old.get(key) != new[key]
    ]
    before = old.get("config", {})
    changed += [f"{f} {before.get(f)} -> {v}" for f, v in new["config"].items() if before.get(f) != v]
    return changed


def use(run_dir: Path, cfg: C.TrainConfig, info: D.DistInfo) -> str | None:
    """With compile on, point Inductor's cache at RUN_DIR/compile_cache (every rank; rank 0 empties one made
    for another fingerprint first) and return the line rank 0 prints about it; None with compile off."""
    if cfg.compile != "true":
        return None
    global _ours
    if os.environ.get(ENV) and os.environ[ENV] not in (_ours, default_cache_dir()):  # Inductor sets its default
        return f"compile cache: {ENV}={os.environ[ENV]} is set, so the run directory keeps none"
    cache = Path(run_dir) / rundir.COMPILE_CACHE
    line = error = None
    if info.is_main:
        try:
            line = _prepare(cache, fingerprint(cfg, info))
        except OSError as e:
            error = (
                f"the compile cache {cache} cannot be used ({e.strerror or e}); remove it, or set {ENV} to a "
                "directory of your own"
            )
    if D.broadcast_object(error, info):
        raise ValueError(error)
    os.environ[ENV] = _ours = str(cache.resolve())
    return line


def _prepare(cache: Path, current: dict) -> str:
    """Empty `cache` where it was made for another fingerprint; the line that says what is reused or why not."""
    path = cache / FINGERPRINT
    try:
        old = json.loads(path.read_text()) if path.is_file() else None
        why = "; ".join(differences(old, current)) if old is not None else ""
    except (json.JSONDecodeError, AttributeError, TypeError):
        old, why = {}, f"its {FINGERPRINT} is unreadable"
    if old == current:
        return f"compile cache: {cache} (kept from an earlier launch: its graphs load instead of compiling)"
    if old is None:
        line = f"compile cache: {cache} (new: this launch compiles, later launches reuse it)"
    else:
        line = f"compile cache: {cache} was made for another program ({why}); compiling afresh"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    write_json_atomic(path, current)
    return line
