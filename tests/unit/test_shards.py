"""The shard format: our writer, llm.c-style and nanoGPT-style directories."""

import numpy as np
import pytest

from gpt2repro import shards


def test_write_then_open_round_trip(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 1234], dtype=np.uint16)
    sha = shards.write_shard(tmp_path / "train_000000.bin", tokens)
    raw = (tmp_path / "train_000000.bin").read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert sha == shards.sha256_file(tmp_path / "train_000000.bin")
    assert not list(tmp_path.glob(".*tmp"))


def test_llmc_style_directory_without_manifest(tmp_path):
    # Named as llm.c's FineWeb script names them.
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            shards.write_shard(tmp_path / f"fineweb_{split}_{i:06d}.bin", np.arange(10 * i, 10 * i + 10))
    found = shards.find_shards(tmp_path)
    assert [s.path.name for s in found["train"]] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    assert np.concatenate([shards.open_tokens(s) for s in found["train"]]).tolist() == list(range(30))
    assert shards.open_tokens(found["val"][0]).tolist() == list(range(10))


def test_nanogpt_headerless_directory(tmp_path):
    train = np.arange(1000, dtype=np.uint16)
    train.tofile(tmp_path / "train.bin")
    np.arange(7, dtype=np.uint16).tofile(tmp_path / "val.bin")
    found = shards.find_shards(tmp_path)
    assert found["train"][0].header_bytes == 0
    assert np.array_equal(shards.open_tokens(found["train"][0]), train)
    assert shards.open_tokens(found["val"][0]).tolist() == list(range(7))


def test_truncated_shard_is_reported(tmp_path):
    path = tmp_path / "x_train_000000.bin"
    shards.write_shard(path, np.arange(100))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(shards.ShardError, match="truncated or corrupt"):
        shards.find_shards(tmp_path)


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(shards.ShardError, match="holds no token shards"):
        shards.find_shards(tmp_path)
    with pytest.raises(shards.ShardError, match="does not exist"):
        shards.find_shards(tmp_path / "missing")
