"""Shared test setup: no leftover process groups, the shipped demo corpus, offline everything.

../shared (this team's workspace only) serves as an independent oracle where it exists:
its tiktoken cache lets tiktoken.get_encoding("gpt2") run offline, to check the bundled
tokenizer against; tests that need it skip without it.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHAKESPEARE = REPO_ROOT / "examples" / "tinyshakespeare.txt"  # shipped with the repository

if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def shakespeare_path() -> Path:
    return SHAKESPEARE


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared by our own data_prep/prepare.py (train + val shards)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    cmd = [sys.executable, str(REPO_ROOT / "data_prep" / "prepare.py"), "--out", str(out), "--files", str(SHAKESPEARE)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 2 MiB tmpfs, to fill up (a checkpoint that meets a full disk); skips without mount rights."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
