"""Fault tolerance's parts that need no lighthouse (gpt2repro/ft.py): how a step's batch is split over the live
replica groups, the settings, and the state a group heals with. The kills and heals run with real processes in
tests/distributed/test_fault_tolerance.py."""

import itertools
import random
from datetime import timedelta

import numpy as np
import pytest
import torch

from gpt2repro import checkpoint, engine, ft, guard, settings
from gpt2repro import config as C
from gpt2repro.config import TrainConfig
from gpt2repro.devices import Machine
from gpt2repro.distributed import DistInfo
from gpt2repro.model import GPT
from gpt2repro.train import TrainState
from tests.unit.test_async_checkpoint import SHAPE, step


@pytest.mark.parametrize("groups", [1, 2, 3, 4])
def test_the_live_groups_split_every_share_of_the_batch_once_whoever_is_alive(groups):
    """With any number of the groups alive, the shares they compute are every place of the full layout, once."""
    group_world = 2
    places = set(range(groups * group_world))
    for live in range(1, groups + 1):
        taken = [
            share
            for index, rank in itertools.product(range(live), range(group_world))
            for share in ft.shares(group_world, groups, live, index, rank)
        ]
        assert sorted(taken) == sorted(places), (live, taken)
        if live == groups > 1:  # all alive: each rank its own place, as without fault tolerance
            assert ft.shares(group_world, groups, live, 1, 1) == [1 * group_world + 1]


def test_the_global_batch_is_every_groups_and_settles_as_one_job_of_all_their_ranks():
    """Two groups of one rank settle the batch split of one job of two ranks: the same global batch."""
    asked = C.resolve(TrainConfig(total_batch_tokens=4096, batch_size=4, block_size=64), 1)
    two_groups = settings.settle(asked.replace(ft_groups=2, ft_group=1), Machine("cpu", 1, 1))
    two_ranks = settings.settle(asked, Machine("cpu", 2, 2))
    assert two_groups.grad_accum_steps == two_ranks.grad_accum_steps == 8


def test_settings_problems_name_the_fix(monkeypatch):
    problems = TrainConfig(ft_groups=2, ft_group=2, ft_min_groups=3).problems()
    assert "ft_group must be below ft_groups (2), got 2" in problems
    assert "ft_min_groups (3) must be at most ft_groups (2)" in problems
    assert TrainConfig(ft_group=5).problems() == []  # off: nothing to check
    monkeypatch.delenv(ft.LIGHTHOUSE_ENV, raising=False)
    with pytest.raises(ValueError, match="pass --ft_lighthouse HOST:PORT or set TORCHFT_LIGHTHOUSE"):
        ft.lighthouse_address(TrainConfig(ft_groups=2))
    monkeypatch.setenv(ft.LIGHTHOUSE_ENV, "http://head:29510")
    assert ft.lighthouse_address(TrainConfig(ft_groups=2)) == "http://head:29510"
    assert ft.lighthouse_address(TrainConfig(ft_groups=2, ft_lighthouse="n1:1234")) == "http://n1:1234"


def test_each_group_has_a_directory_of_its_own(tmp_path):
    assert ft.group_dir(tmp_path, TrainConfig()) == tmp_path
    assert ft.group_dir(tmp_path, TrainConfig(ft_groups=3, ft_group=2)) == tmp_path / "group_2"


def trained(lr: float = 6e-4, steps: int = 2):
    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256, lr=lr)
    torch.manual_seed(0)
    model = GPT(SHAPE)
    optimizer, scaler = engine.make_optimizer(model, cfg), engine.make_scaler("float16", "cpu")
    for i in range(steps):
        step(model, optimizer, i)
    spike_guard = guard.SpikeGuard(8.0, 16, "cpu")
    for i in range(steps):
        spike_guard.check(i + 1, torch.tensor(5.0 - i), torch.tensor(1.0))
    saver = checkpoint.Checkpointer("unused", cfg, model, optimizer, scaler, DistInfo(), spike_guard)
    return model, optimizer, scaler, spike_guard, saver


def test_a_group_heals_to_its_peers_whole_state_bitwise():
    """A fresh group (no optimizer state yet) takes a trained peer's live state: weights, AdamW moments and step,
    scaler, guard window, counters and RNG, bit for bit."""
    model, optimizer, scaler, spike_guard, peer = trained(steps=3)
    scaler.scale(torch.ones(()))
    scaler.update(1024.0)
    state = TrainState(step=3, tokens=999, skipped_steps=1, spikes=2, data_offset=4, rollbacks=1)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    sent = peer.live_state(state)
    expected_draw = torch.rand(3)

    fresh_model, fresh_optimizer, fresh_scaler, fresh_guard, fresh = trained(steps=0)
    healed = TrainState()
    torch.manual_seed(99)
    fresh.load_live_state(sent, healed)
    assert healed == state
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert fresh_scaler.get_scale() == 1024.0
    assert torch.allclose(fresh_guard.values, spike_guard.values, rtol=0, atol=0, equal_nan=True)  # empty: nan
    assert torch.equal(torch.rand(3), expected_draw)  # the peer's random stream goes on here


def test_a_peer_of_another_run_is_refused_before_anything_is_loaded():
    *_, peer = trained(lr=1e-3)
    fresh_model, *_, fresh = trained(steps=0)
    before = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    with pytest.raises(checkpoint.PeerMismatch, match=r"another run .*lr: 0.001 -> 0.0006"):
        fresh.load_live_state(peer.live_state(TrainState(step=2)), TrainState())
    assert all(torch.equal(before[k], v) for k, v in fresh_model.state_dict().items())


def test_dropout_masks_follow_the_share_not_the_group():
    """The seed of a share's masks is a function of (seed, step, share): distinct across shares and steps."""
    seeds = {ft.dropout_seed(1337, s, share) for s in range(1, 50) for share in range(8)}
    assert len(seeds) == 49 * 8


def test_the_cross_group_process_group_is_nccl_between_gpus_and_gloo_between_cpus(monkeypatch):
    import torchft

    assert isinstance(ft._cross_group_pg("cpu", timedelta(seconds=5)), torchft.ProcessGroupGloo)
    built = []  # this CPU build of torch has no NCCL to build one with: the choice is what is checked
    monkeypatch.setattr(torchft, "ProcessGroupNCCL", lambda timeout: built.append(timeout) or "nccl")
    assert ft._cross_group_pg("cuda", timedelta(seconds=5)) == "nccl" and built == [timedelta(seconds=5)]
