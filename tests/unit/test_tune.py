"""The tune's candidates, command line and forecast arithmetic (gpt2repro/tune.py); tests/distributed/
test_tune.py checks them against real runs."""

import csv
import math

import pytest

from gpt2repro import config as C
from gpt2repro import forecast, references, tune
from gpt2repro.metrics import format_line
from gpt2repro.presets import PRESETS
from gpt2repro.settings import Machine


def test_candidates_keep_the_global_batch_and_try_each_strategy_that_applies():
    cfg = PRESETS["gpt2-124m"].replace(batch_size=16, grad_accum_steps=4)
    one = tune.candidates(cfg, Machine("cuda", 1, 1, 80 * 2**30))
    assert {(c.batch_size, c.grad_accum_steps) for c in one} == {
        (1, 64),
        (2, 32),
        (4, 16),
        (8, 8),
        (16, 4),
        (32, 2),
        (64, 1),
    }
    assert {c.strategy for c in one} == {"ddp"} and {c.fused_loss for c in one} == {"true", "false"}
    assert all(not c.activation_checkpointing for c in one)
    assert [c.batch_size for c in one if c.fused_loss == "false"] == [1, 2, 4, 8, 16, 32, 64]  # smallest first
    nodes = tune.candidates(cfg, Machine("cuda", 16, 8, 80 * 2**30))
    assert {c.strategy for c in nodes} == {"ddp", "fsdp", "hsdp"}
    assert {c.strategy for c in tune.candidates(cfg, Machine("cuda", 8, 8, 80 * 2**30))} == {"ddp", "fsdp"}


def test_the_command_line_is_the_launch_with_the_layout_set():
    argv = [
        "--config",
        "gpt2-124m",
        "--data",
        "d",
        "--batch_size=32",
        "--tune",
        "true",
        "--tune_out",
        "t.json",
        "--strategy",
        "auto",
        "--lr",
        "1e-3",
    ]
    chosen = PRESETS["gpt2-124m"].replace(batch_size=8, grad_accum_steps=4, strategy="ddp", fused_loss="false")
    line = tune.command(argv, tune.layout_args(chosen))
    assert "--tune" not in line and "t.json" not in line and "--batch_size=32" not in line and "auto" not in line
    assert line.endswith(
        "--config gpt2-124m --data d --lr 1e-3 --batch_size 8 --grad_accum_steps 4 "
        "--activation_checkpointing false --fused_loss false --strategy ddp"
    )


def test_the_forecast_adds_steps_start_up_evals_and_checkpoints():
    cfg = C.TrainConfig(max_steps=1000, eval_interval=300, ckpt_interval=500, gpu_hour_cost=2.0)
    f = forecast.Forecast(cfg, world_size=8, step_s=0.5, startup_s=60.0, eval_s=10.0, ckpt_s=30.0)
    assert (f.evals, f.ckpts) == (4, 2)  # 300, 600, 900 and the last step; 500 and 1000
    assert f.total_s == 60 + 999 * 0.5 + 4 * 10 + 2 * 30
    assert f.seconds_to(600) == 60 + 599 * 0.5 + 2 * 10 + 1 * 30
    text = f.describe()
    assert f"({f.total_s:.1f} s)" in text and f"${f.total_s / 3600 * 8 * 2:,.2f}" in text


def test_the_time_to_target_follows_the_reference_curve():
    """llm.c's 124M curve crosses GPT-2 124M's FineWeb loss (3.4250) between two of its logged evals: the
    forecast's step lies between those evals' steps at llm.c's 524,288 tokens per step."""
    curve, target = forecast.reference_and_target("llmc-124m-fineweb10B", "fineweb10B")
    assert target.name == "gpt2-124m@fineweb"
    cfg = C.TrainConfig(batch_size=64, block_size=1024, grad_accum_steps=1, max_steps=19560)
    f = forecast.Forecast(cfg, 8, 0.3, 0.0, 0.0, 0.0, curve, target)
    with open(references.ASSETS / "llmc-gpt2-124m-fineweb10B-val.csv") as rows:
        points = [(float(r["tokens"]), float(r["val_loss"])) for r in csv.DictReader(rows)]
    after = next(i for i, (_, v) in enumerate(points) if v <= target.val_loss)
    steps = [math.ceil(t / 524288) for t, _ in points[after - 1 : after + 1]]
    assert steps[0] <= f.target_step() <= steps[1]
    assert "reaches gpt2-124m@fineweb's val loss 3.4250 at step" in f.describe()
    assert forecast.reference_and_target("", "fineweb10B") == (None, None)


@pytest.mark.parametrize(("eta", "shown"), [(0.0, "gpt2-124m@owt's loss: reached"), (3725.0, "in ~1h02m05s")])
def test_each_eval_line_says_when_the_target_is_reached(eta, shown):
    record = {
        "step": 10,
        "val_loss": 3.3,
        "verdict": "on track",
        "ref_val_loss": 3.2,
        "ref_gap": 0.1,
        "target_eta_s": eta,
    }
    assert shown in format_line(record, 100, None, "llmc", "gpt2-124m@owt")


def test_the_table_on_a_gpu_names_it_and_gives_peak_memory_and_mfu():
    """The table's CUDA branch under faked H100 properties: the card's name, the measured peak per GPU, and
    MFU against the H100's bf16 peak that settling found."""
    from gpt2repro.distributed import DistInfo
    from gpt2repro.settings import settle
    from tests.fake_cuda import fake_gpu

    with fake_gpu("sm90"):
        cfg = settle(PRESETS["gpt2-124m"], Machine.this("cuda:0", 8, 8))
        fits = tune.Trial(cfg, step_s=0.25, peak_bytes=30 * 2**30)
        refused = tune.Trial(cfg.replace(batch_size=64, grad_accum_steps=1), fits=False, why="out of memory: ...")
        text = tune.table([fits, refused], DistInfo(device="cuda:0", world_size=8))
    tokens = cfg.batch_size * cfg.grad_accum_steps * 1024 * 8 / 0.25
    assert "tune on 8 x NVIDIA H100 80GB HBM3" in text and f"{tokens:,.0f}" in text and "30.00" in text
    assert cfg.peak_tflops == 989.0 and "%" in text.splitlines()[2]
    assert "does not fit: out of memory" in text.splitlines()[3]
