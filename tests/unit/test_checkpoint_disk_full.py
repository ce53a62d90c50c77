"""A save that hits a full disk (a real, tiny tmpfs) leaves the previous checkpoint intact and says so."""

import pytest
import torch

from gpt2repro import checkpoint
from gpt2repro.distributed import DistInfo


def test_full_disk_keeps_the_previous_checkpoint(tiny_filesystem):
    run_dir, one_process = tiny_filesystem / "run", DistInfo()
    small = {"model": {"w": torch.arange(10_000.0)}}
    first = checkpoint.save(run_dir, 1, small, {"step": 1}, {"config": {}}, one_process)
    big = {"model": {"w": torch.zeros(1_000_000)}}  # 4 MB
    with pytest.raises(checkpoint.CheckpointError, match=r"No space left on device.*step_00000001 is intact"):
        checkpoint.save(run_dir, 2, big, {"step": 2}, {"config": {}}, one_process)
    assert checkpoint.latest_valid(run_dir) == first
    assert [p.name for p in checkpoint.checkpoint_dir(run_dir).iterdir()] == ["step_00000001"]
    loaded = {"model": {"w": torch.zeros(10_000)}}
    checkpoint.load_state(first, loaded)
    assert torch.equal(loaded["model"]["w"], torch.arange(10_000.0))
