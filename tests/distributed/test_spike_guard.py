"""The loss-spike guard (--spike_zscore) against a real fault: a stretch of training batches whose
tokens are one repeated token, placed at the steps that read them (the data order is a pure
function of seed and step). Unguarded, the model learns the stretch and ends measurably worse than
the clean run; guarded, exactly those updates are skipped and the run ends where the clean one does.
A healthy run is bitwise the same with the guard on."""

import shutil
import subprocess

import numpy as np
import pytest
import torch

from gpt2repro import shards
from gpt2repro.data import BatchSpec, ShardLoader
from gpt2repro.guard import SpikeGuard
from tests.distributed.helpers import env, losses, metrics, train_cmd

POISONED = range(200, 221)  # the steps whose batches are poisoned: after the warmup and a full window
RUN = ["--max_steps", 400, "--warmup_steps", 60, "--log_interval", 10, "--eval_interval", 400, "--eval_tokens", 4096,
       "--ckpt_interval", 400]  # fmt: skip


def poison(data, out, steps, batch_size=4, block_size=32, seed=1337):
    """A copy of data whose windows read at `steps` hold one repeated token (their first and last tokens,
    which their neighbours share, kept)."""
    shutil.copytree(data, out)
    loader = ShardLoader(str(out), block_size, 50257, BatchSpec(batch_size, 1, 1, 0), seed, "cpu")
    tokens = [np.array(shards.open_tokens(s)) for s in loader.shards]
    for step in steps:
        for g in range((step - 1) * batch_size, step * batch_size):
            epoch, i = divmod(g, loader.num_windows)
            shard_ids, window_ids = loader._epoch_order(epoch)
            start = int(window_ids[i]) * block_size
            tokens[shard_ids[i]][start + 1 : start + block_size] = 13  # "."
    for shard, t in zip(loader.shards, tokens, strict=True):
        shards.write_shard(shard.path, t)
    return out


@pytest.fixture(scope="module")
def runs(shakespeare_data, tmp_path_factory):
    """Four runs at once (one thread each): clean and poisoned data, with the guard off and on."""
    root = tmp_path_factory.mktemp("spikes")
    bad = poison(shakespeare_data, root / "poisoned", POISONED)
    cases = {"clean": (shakespeare_data, []), "clean_guarded": (shakespeare_data, ["--spike_zscore", 10]),
             "poisoned": (bad, []), "poisoned_guarded": (bad, ["--spike_zscore", 10])}  # fmt: skip
    procs = {
        name: subprocess.Popen(
            train_cmd(data, root / name, *RUN, *extra),
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, (data, extra) in cases.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    return {name: root / name for name in cases}


def final_val(run_dir) -> float:
    return [r["val_loss"] for r in metrics(run_dir) if "val_loss" in r][-1]


def test_a_healthy_run_is_bitwise_the_same_with_the_guard_on(runs):
    assert losses(runs["clean_guarded"]) == losses(runs["clean"])
    logged = [r for r in metrics(runs["clean_guarded"]) if "spikes" in r]
    assert logged and all(r["spikes"] == 0 for r in logged)
    assert max(r["max_z"] for r in logged) < 10  # the healthy run's largest z-score, under the threshold


def test_a_poisoned_stretch_is_skipped_and_the_run_ends_where_the_clean_one_does(runs):
    clean, unguarded, guarded = (final_val(runs[k]) for k in ("clean", "poisoned", "poisoned_guarded"))
    by_step = {r["step"]: r for r in metrics(runs["poisoned_guarded"]) if "spikes" in r}
    assert by_step[190]["spikes"] == 0 and by_step[230]["spikes"] == len(POISONED)  # those steps, no others
    assert by_step[400]["spikes"] == len(POISONED)
    assert abs(guarded - clean) / clean < 0.01, (guarded, clean)
    assert (unguarded - clean) / clean > 0.015, (unguarded, clean)  # unguarded: measurably worse
    # Unguarded, the model learns the stretch: its loss on those batches collapses.
    assert losses(runs["poisoned"])[220] < 1.0 < losses(runs["poisoned_guarded"])[220]


def test_the_guard_judges_after_the_warmup_against_a_full_window_and_keeps_spikes_out_of_it():
    guard = SpikeGuard(zscore=5, window=8, device="cpu", after_step=3)
    torch.manual_seed(0)
    normal = [(7 + 0.1 * torch.randn(()).item(), 0.7 + 0.05 * torch.randn(()).item()) for _ in range(20)]
    decided = []
    for step, (loss, norm) in enumerate(normal[:11], start=1):  # 3 warmup steps, then 8 to fill the window
        decided.append(bool(guard.check(step, torch.tensor(loss), torch.tensor(norm))))
    assert not any(decided) and int(guard.count) == 8
    window = guard.values.clone()
    assert bool(guard.check(12, torch.tensor(7.0), torch.tensor(9.0)))  # a grad-norm spike
    assert torch.equal(guard.values, window)  # kept out of the window
    assert not bool(guard.check(13, torch.tensor(3.0), torch.tensor(0.7)))  # far below: no spike
    assert bool(guard.check(14, torch.tensor(20.0), torch.tensor(0.7)))  # a loss spike
    state = guard.state_dict()
    again = SpikeGuard(zscore=5, window=8, device="cpu", after_step=3)
    again.load_state_dict(state)
    assert torch.equal(again.values, guard.values) and int(again.count) == int(guard.count)
