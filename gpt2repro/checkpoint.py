"""Checkpoints: atomic save, integrity-checked load, newest-valid lookup, retention.

A checkpoint is a directory RUN_DIR/checkpoints/step_XXXXXXXX holding torch files and a
meta.json with each file's size and sha256. It is written under a temporary name and
renamed into place only when complete, so a kill mid-write never leaves a directory
that looks valid; a damaged one (missing file, wrong size or hash) is reported and
skipped in favour of the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from gpt2repro.shards import sha256_file, write_json_atomic

META_NAME = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, files: dict[str, object], meta: dict) -> Path:
    """Write `files` (name -> object for torch.save) as the checkpoint of `step`; return its path."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step_{step:08d}-"))
    try:
        entries = {}
        for name, obj in files.items():
            path = tmp / name
            with open(path, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            entries[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        write_json_atomic(tmp / META_NAME, {**meta, "step": step, "files": entries})
        if final.exists():  # the same step again (a rerun after a crash): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save reports a full disk as a RuntimeError from its zip writer, raised while
        # handling the OSError: look for the OSError in the chain.
        os_error = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if os_error is None:
            raise
        previous = latest_valid(run_dir, report=None)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"Could not write checkpoint {final} ({os_error.strerror or os_error}); {kept}."
        ) from None
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def problem(path: Path) -> str | None:
    """Why the checkpoint at path is unusable, or None when it is complete and intact."""
    meta_file = path / META_NAME
    if not meta_file.is_file():
        return f"checkpoint {path} has no {META_NAME} (incomplete)"
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        return f"checkpoint {path} has a corrupt {META_NAME}"
    for name, entry in meta["files"].items():
        f = path / name
        if not f.is_file():
            return f"checkpoint {path} is missing {name}"
        if f.stat().st_size != entry["bytes"]:
            return f"checkpoint {path}: {name} is {f.stat().st_size} bytes, expected {entry['bytes']} (truncated)"
        if sha256_file(f) != entry["sha256"]:
            return f"checkpoint {path}: {name} does not match its sha256 (corrupt)"
    return None


def list_steps(run_dir: Path) -> list[Path]:
    """Final-named checkpoint directories, oldest first (temporary ones excluded)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_valid(run_dir: Path, report=print) -> Path | None:
    """The newest intact checkpoint; each damaged newer one is reported in one line and skipped."""
    for path in reversed(list_steps(run_dir)):
        why = problem(path)
        if why is None:
            return path
        if report is not None:
            report(f"warning: {why}; falling back to the previous checkpoint")
    return None


def load(path: Path) -> dict[str, object]:
    """Every file of an intact checkpoint, loaded with weights_only=True, plus its meta."""
    path = Path(path)
    why = problem(path)
    if why is not None:
        raise CheckpointError(why[0].upper() + why[1:] + "; pass another checkpoint or --resume auto.")
    meta = json.loads((path / META_NAME).read_text())
    out = {name: torch.load(path / name, map_location="cpu", weights_only=True) for name in meta["files"]}
    out["meta"] = meta
    return out


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; never delete the newest one."""
    # Complete = renamed into place with its meta.json; hashing every one at each save would cost
    # minutes for the big models, so full integrity checks are left to resume.
    intact = [p for p in list_steps(run_dir) if (p / META_NAME).is_file()]
    for path in intact[: max(0, len(intact) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in checkpoint_dir(run_dir).glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve_path(run_dir_or_ckpt: str | os.PathLike) -> Path:
    """A checkpoint directory as given, or the newest intact one of a run directory."""
    path = Path(run_dir_or_ckpt)
    if (path / META_NAME).is_file():
        return path
    newest = latest_valid(path)
    if newest is None:
        raise CheckpointError(f"{path} is neither a checkpoint nor a run directory with an intact checkpoint.")
    return newest


def load_model(run_dir_or_ckpt: str | os.PathLike):
    """The trained GPT of a checkpoint (or of a run directory's newest), in eval mode on the CPU."""
    from gpt2repro.config import MODEL_FIELDS
    from gpt2repro.model import GPT, GPTConfig

    path = resolve_path(run_dir_or_ckpt)
    ckpt = load(path)
    saved = ckpt["meta"]["config"]
    state = ckpt["model.pt"]
    padded = state["transformer.wte.weight"].shape[0]
    config = GPTConfig(
        **{f: saved[f] for f in MODEL_FIELDS}, pad_vocab_multiple=padded if padded != saved["vocab_size"] else 1
    )
    model = GPT(config)
    model.load_state_dict(state)
    return model.eval()
