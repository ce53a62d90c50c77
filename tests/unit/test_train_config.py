import math

import numpy as np
import pytest

from gpt2repro import config as C
from gpt2repro import shards
from gpt2repro.data import BatchSpec, ShardLoader


def test_cosine_schedule_with_warmup():
    cfg = C.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert C.lr_at(0, cfg) == pytest.approx(0.1)
    assert C.lr_at(9, cfg) == pytest.approx(1.0)
    assert C.lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert C.lr_at(110, cfg) == pytest.approx(0.1) and C.lr_at(500, cfg) == pytest.approx(0.1)


def test_wsd_and_constant_schedules():
    wsd = C.TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100, lr_schedule="wsd", decay_steps=20)
    assert C.lr_at(79, wsd) == 1.0 and C.lr_at(90, wsd) == pytest.approx(0.5) and C.lr_at(100, wsd) == 0.0
    const = C.TrainConfig(lr=0.3, warmup_steps=0, lr_schedule="constant")
    assert C.lr_at(12345, const) == 0.3


def test_gpt2_124m_preset_matches_nanogpt():
    cfg = C.resolve(C.PRESETS["gpt2-124m"], world_size=8)
    assert (cfg.batch_size, cfg.block_size, cfg.grad_accum_steps) == (12, 1024, 5)
    assert cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * 8 == 491_520
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == (6e-4, 6e-5, 2000, 600_000)
    assert (cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.grad_clip) == (0.1, 0.9, 0.95, 1.0)
    assert C.resolve(C.PRESETS["gpt2-124m"], world_size=1).grad_accum_steps == 40


def test_overrides_parse_both_forms_and_types():
    cfg = C.parse_overrides(C.PRESETS["gpt2-124m"], ["--lr=3e-4", "--max_steps", "5e3", "--bias", "false"])
    assert (cfg.lr, cfg.max_steps, cfg.bias) == (3e-4, 5000, False)


def test_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"n_layer": 2, "lr": 0.01}')
    assert C.load_base(str(path)).n_layer == 2
    path.write_text('{"n_layers": 2}')
    with pytest.raises(ValueError, match="did you mean --n_layer"):
        C.load_base(str(path))


def _loader(tmp_path, spec: BatchSpec) -> ShardLoader:
    data = tmp_path / "d"
    if not data.exists():
        data.mkdir()
        rng = np.random.default_rng(0)
        for i, n in enumerate((530, 1000, 77, 641)):
            shards.write_shard(data / f"x_train_{i:06d}.bin", rng.integers(0, 1000, n))
    return ShardLoader(str(data), block_size=16, vocab_size=1000, spec=spec, seed=3, device="cpu")


def test_global_batches_do_not_depend_on_ranks_or_accumulation(tmp_path):
    one = _loader(tmp_path, BatchSpec(batch_size=4, grad_accum_steps=2, world_size=1, rank=0))
    ranks = [_loader(tmp_path, BatchSpec(batch_size=4, grad_accum_steps=1, world_size=2, rank=r)) for r in (0, 1)]
    for step in range(30):  # several epochs
        a = sorted(map(tuple, np.concatenate([one.batch(step, m)[0].numpy() for m in range(2)]).tolist()))
        b = sorted(map(tuple, np.concatenate([ld.batch(step, 0)[0].numpy() for ld in ranks]).tolist()))
        assert a == b


def test_an_epoch_visits_every_window_once(tmp_path):
    loader = _loader(tmp_path, BatchSpec(batch_size=1, grad_accum_steps=1, world_size=1, rank=0))
    n = loader.num_windows
    assert n == sum((size - 1) // 16 for size in (530, 1000, 77, 641))
    seen = {tuple(loader.batch(step, 0)[0][0].tolist()) for step in range(n)}
    assert len(seen) == n  # without replacement
    second_epoch = [tuple(loader.batch(step, 0)[0][0].tolist()) for step in range(n, 2 * n)]
    assert set(second_epoch) == seen and second_epoch != [tuple(loader.batch(s, 0)[0][0].tolist()) for s in range(n)]
    assert math.isclose(loader.epoch_of(n), 1.0)
