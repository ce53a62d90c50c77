"""Checkpoints written in the background (--ckpt_async, the default), in one process: what a checkpoint holds
when training changes the weights while it is being written, and a failed background write. The kill -9, stop
and end-of-run properties run with real processes in tests/distributed/test_async_checkpoint.py."""

import subprocess
import threading

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _FileSystemWriter

from gpt2repro import checkpoint, engine, guard, train
from gpt2repro.config import TrainConfig
from gpt2repro.distributed import DistInfo
from gpt2repro.model import GPT, GPTConfig

SHAPE = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)


def trainer(run_dir, ckpt_async=True, **config):
    """A model with AdamW state from one real step, and its Checkpointer."""
    cfg = TrainConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256, ckpt_async=ckpt_async, keep_ckpts=5, **config
    )
    torch.manual_seed(0)
    model = GPT(SHAPE)
    optimizer, scaler = engine.make_optimizer(model, cfg), engine.make_scaler("float32", "cpu")
    step(model, optimizer, 0)
    return model, optimizer, checkpoint.Checkpointer(run_dir, cfg, model, optimizer, scaler, DistInfo())


def step(model, optimizer, seed: int) -> None:
    batch = torch.randint(0, SHAPE.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    model(batch[:, :-1], batch[:, 1:], return_logits=False)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def snapshot(model, optimizer) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "exp_avg": [s["exp_avg"].clone() for s in optimizer.state.values()],
    }


def test_the_checkpoint_holds_its_steps_state_not_what_training_did_next(tmp_path, monkeypatch):
    """The trap of pytorch#144657: CPU tensors handed to a background writer that writes them after training has
    changed them in place. Forced here: the write waits until training has taken two more steps and scribbled
    over every weight."""
    model, optimizer, saver = trainer(tmp_path / "run")
    saver.guard = spike_guard = guard.SpikeGuard(8.0, 16, "cpu")  # its window goes into trainer.pt
    for i in range(3):
        spike_guard.check(i + 1, torch.tensor(5.0 - i), torch.tensor(1.0))
    window = spike_guard.values.clone()
    trained = threading.Event()
    write_data = _FileSystemWriter.write_data

    def write_after_training(self, plan, planner):
        assert trained.wait(60), "the test never let the write go"
        return write_data(self, plan, planner)

    monkeypatch.setattr(_FileSystemWriter, "write_data", write_after_training)
    before = snapshot(model, optimizer)
    saver.save(train.TrainState(step=1, tokens=64))  # returns with the write still held
    assert saver.pending is not None and not saver.pending.done()
    step(model, optimizer, 1)
    step(model, optimizer, 2)
    spike_guard.check(4, torch.tensor(2.0), torch.tensor(1.0))  # the next step's loss, into the window in place
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    trained.set()
    written = saver.wait()
    saver.close()
    assert written.step == 1 and written.path == tmp_path / "run" / "checkpoints" / "step_00000001"
    assert checkpoint.problem(written.path) is None  # complete and intact

    fresh_model, fresh_optimizer, loader = trainer(tmp_path / "other", ckpt_async=False)
    step(fresh_model, fresh_optimizer, 5)  # its own, different state: every number below comes from the file
    loader.load(written.path, train.TrainState())
    after = snapshot(fresh_model, fresh_optimizer)
    for name, value in before["model"].items():
        assert torch.equal(after["model"][name], value), name
        assert not torch.equal(model.state_dict()[name], value), name  # training did change it meanwhile
    for a, b in zip(after["exp_avg"], before["exp_avg"], strict=True):
        assert torch.equal(a, b)
    saved_window = checkpoint.read_trainer(written.path)["guard"]["values"]
    torch.testing.assert_close(saved_window, window, rtol=0, atol=0, equal_nan=True)  # the window of step 1
    assert not torch.allclose(spike_guard.values, window, equal_nan=True)  # the guard did move on meanwhile


def test_background_and_foreground_saves_write_the_same_checkpoint(tmp_path):
    model, optimizer, saver = trainer(tmp_path / "async")
    saver.save(train.TrainState(step=3, tokens=64))
    background = saver.wait().path
    saver.close()
    _, _, sync_saver = trainer(tmp_path / "sync", ckpt_async=False)
    foreground = sync_saver.save(train.TrainState(step=3, tokens=64))
    a, b = checkpoint.read_meta(background)["files"], checkpoint.read_meta(foreground)["files"]
    state = {k: v for k, v in a.items() if k.startswith("state/") and not k.endswith(".metadata")}
    assert state and all(b[k] == v for k, v in state.items())  # the same bytes: the same sha256s


def test_a_background_save_that_fills_the_disk_fails_in_one_line_and_keeps_the_previous(tiny_filesystem):
    run_dir = tiny_filesystem / "run"
    model, optimizer, saver = trainer(run_dir)
    saver.save(train.TrainState(step=1, tokens=64))
    first = saver.wait().path
    free = subprocess.run(["df", "--output=avail", "-B1", str(tiny_filesystem)], capture_output=True, text=True)
    (tiny_filesystem / "filler").write_bytes(b"\0" * (int(free.stdout.split()[-1]) - 64 * 1024))
    saver.save(train.TrainState(step=2, tokens=128))
    with pytest.raises(checkpoint.CheckpointError, match=r"No space left on device.*step_00000001 is intact"):
        saver.wait()
    saver.close()
    assert checkpoint.latest_valid(run_dir) == first
    assert [p.name for p in checkpoint.checkpoint_dir(run_dir).iterdir()] == ["step_00000001"]


def test_without_room_in_host_memory_for_the_copy_checkpoints_are_written_synchronously(tmp_path, monkeypatch):
    model, optimizer, _ = trainer(tmp_path / "unused")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(checkpoint, "_available_host_bytes", lambda: 5 * weights)  # the copy needs 3x, half is 2.5x
    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256)
    saver = checkpoint.Checkpointer(
        tmp_path / "run", cfg, model, optimizer, engine.make_scaler("float32", "cpu"), DistInfo()
    )
    assert not saver.asynchronous
    assert saver.why_sync.startswith("warning: checkpoints are written synchronously: in the background they need")
    assert saver.why_sync.endswith("--ckpt_async false chooses this without the warning")
    path = saver.save(train.TrainState(step=1, tokens=64))
    assert saver.pending is None and checkpoint.problem(path) is None  # complete when save() returns
    monkeypatch.setattr(checkpoint, "_available_host_bytes", lambda: 7 * weights)
    roomy = checkpoint.Checkpointer(
        tmp_path / "run2", cfg, model, optimizer, engine.make_scaler("float32", "cpu"), DistInfo()
    )
    assert roomy.asynchronous and not roomy.why_sync
    roomy.close()


def test_from_a_gpu_the_copy_goes_to_pinned_memory_without_blocking_and_on_a_cpu_plainly():
    gpu, cpu = checkpoint.staging_options("cuda"), checkpoint.staging_options("cpu")
    assert (gpu.use_pinned_memory, gpu.use_non_blocking_copy) == (True, True)
    assert (cpu.use_pinned_memory, cpu.use_non_blocking_copy) == (False, False)
    # Staged in the training thread (the stall is the copy), never into shared memory.
    assert not any((gpu.use_async_staging, gpu.use_shared_memory, cpu.use_async_staging, cpu.use_shared_memory))
