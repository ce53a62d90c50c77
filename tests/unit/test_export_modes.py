"""Files that launch/export.py writes get the mode a plain open() gives (0666 less the umask), not mkstemp's 0600."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2repro.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_export_writes_follows_the_umask(tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "source"
    GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8)).save_pretrained(source)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "export.py"), "--ckpt", str(source)]
        + ["--pt", str(out / "model.pt"), "--hf", str(out / "hf"), "--llmc", str(out / "model.bin")],
        capture_output=True,
        text=True,
        umask=0o022,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["hf/config.json", "hf/model.safetensors", "model.bin", "model.pt"]  # and no temp files
    assert {name: oct(_mode(out / name)) for name in written} == {name: oct(0o644) for name in written}


def test_atomic_writes_follow_the_umask_and_leave_nothing_on_error(tmp_path):
    from gpt2repro.shards import atomic_file, atomic_path

    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "a.json", "w") as f:
            f.write("{}\n")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"new")
        with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.bin") == 0o640
    assert (tmp_path / "b.bin").read_bytes() == b"new"  # the failed write left the old content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]
