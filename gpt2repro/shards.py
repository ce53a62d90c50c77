"""The token shard format: write, open, validate and discover shards (numpy only, no torch).

A shard is llm.c-compatible: a header of 256 little-endian int32 (magic 20240520,
version 1, number of tokens), then the tokens as little-endian uint16. A prepared
dataset directory holds `manifest.json` (written last, so its presence means the
directory is complete) and `train_000000.bin`, ..., `val_000000.bin`.

The reader also accepts directories without a manifest: llm.c-style headered shards
(`*train*.bin`, `*val*.bin`) and nanoGPT's headerless uint16 `train.bin` / `val.bin`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in uint16, half the bytes of int32
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A shard or dataset directory that cannot be read as it is."""


@dataclass(frozen=True)
class Shard:
    path: Path
    num_tokens: int
    header_bytes: int  # HEADER_BYTES for llm.c-style shards, 0 for nanoGPT's headerless files


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """A temp file's path beside `path`, for writers that take a file name (safetensors' save_file).

    Once the block ends, what was written there is fsynced, given the mode a plain open() would
    give (0666 less the umask; mkstemp makes 0600) and renamed onto `path`, so that `path` only
    ever holds a complete file. On any error the temp file is removed and `path` keeps its
    previous content. atomic_file is this with the file opened; the package writes through them.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # fsync reaches the writer's data through any descriptor of the file
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """A file object whose content appears at `path` only once complete (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write tokens as a headered shard atomically; return its sha256."""
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    sha = hashlib.sha256()
    with atomic_file(path) as f:
        for part in (header.tobytes(), memoryview(tokens).cast("B")):
            sha.update(part)
            f.write(part)
    return sha.hexdigest()


def read_header(path: str | os.PathLike) -> np.ndarray | None:
    """The 256-int32 header if the file starts with the shard magic, else None."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        return None
    header = np.frombuffer(raw, dtype="<i4")
    return header if header[0] == MAGIC else None


def check_shard(path: str | os.PathLike) -> Shard:
    """Validate a headered shard's header against its size on disk."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"Shard {path} does not exist; re-run data_prep/prepare.py for this dataset.")
    header = read_header(path)
    if header is None:
        raise ShardError(f"{path} is not a token shard (bad magic number); re-run data_prep/prepare.py.")
    if header[1] != VERSION:
        raise ShardError(f"{path} has shard version {header[1]}, expected {VERSION}; re-run data_prep/prepare.py.")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if path.stat().st_size != expected:
        raise ShardError(
            f"{path} is {path.stat().st_size} bytes but its header promises {expected} "
            "(truncated or corrupt); re-run data_prep/prepare.py."
        )
    return Shard(path, num_tokens, HEADER_BYTES)


def open_tokens(shard: Shard) -> np.memmap:
    """The shard's tokens as a read-only uint16 memmap (no copy into RAM)."""
    return np.memmap(shard.path, dtype=TOKEN_DTYPE, mode="r", offset=shard.header_bytes, shape=(shard.num_tokens,))


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            sha.update(chunk)
    return sha.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    with atomic_file(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def read_manifest(data_dir: str | os.PathLike) -> dict | None:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); re-run data_prep/prepare.py.") from None
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ShardError(
            f"{path} has format_version {manifest.get('format_version')!r}, expected {MANIFEST_VERSION}; "
            "re-run data_prep/prepare.py."
        )
    return manifest


def find_shards(data_dir: str | os.PathLike) -> dict[str, list[Shard]]:
    """The shards of each split in a dataset directory, in order.

    Our manifest first; else llm.c-style headered `*train*.bin` / `*val*.bin`; else
    nanoGPT's headerless `train.bin` / `val.bin`.
    """
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ShardError(f"Data directory {data_dir} is a file; pass the directory data_prep/prepare.py wrote.")
    if not data_dir.is_dir():
        raise ShardError(f"Data directory {data_dir} does not exist; prepare it with data_prep/prepare.py.")
    manifest = read_manifest(data_dir)
    if manifest is not None:
        found = {}
        for split in SPLITS:
            entries = manifest["splits"].get(split, {}).get("shards", [])
            found[split] = [_manifest_shard(data_dir, entry) for entry in entries]
        return found
    found = {split: [] for split in SPLITS}
    for split in SPLITS:
        for path in sorted(data_dir.glob(f"*{split}*.bin")):
            if read_header(path) is not None:
                found[split].append(check_shard(path))
    if not any(found.values()):
        for split in SPLITS:
            path = data_dir / f"{split}.bin"
            if path.is_file():
                size = path.stat().st_size
                if size % TOKEN_DTYPE.itemsize:
                    raise ShardError(f"{path} has an odd number of bytes; it is not a uint16 token file.")
                found[split] = [Shard(path, size // TOKEN_DTYPE.itemsize, 0)]
    if not any(found.values()):
        raise ShardError(
            f"{data_dir} holds no token shards (no manifest.json, no *train*.bin / *val*.bin); "
            "prepare it with data_prep/prepare.py."
        )
    return found


def _manifest_shard(data_dir: Path, entry: dict) -> Shard:
    shard = check_shard(data_dir / entry["file"])
    if shard.num_tokens != entry["num_tokens"]:
        raise ShardError(
            f"{shard.path} holds {shard.num_tokens} tokens but the manifest says {entry['num_tokens']}; "
            "re-run data_prep/prepare.py."
        )
    return shard


def verify(data_dir: str | os.PathLike) -> list[str]:
    """Re-hash every shard against the manifest and check every header; return the problems found."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is None:
        return [f"{data_dir} has no {MANIFEST_NAME}: it is not a complete prepared dataset."]
    problems = []
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            path = data_dir / entry["file"]
            try:
                _manifest_shard(data_dir, entry)
            except ShardError as e:
                problems.append(str(e))
                continue
            if sha256_file(path) != entry["sha256"]:
                problems.append(f"{path} does not match its sha256 in the manifest (corrupt); re-run prepare.py.")
    return problems
