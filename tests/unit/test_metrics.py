"""What a run writes about itself: strict JSON in metrics.jsonl, MFU against the right peak,
a GradScaler that a skipped bf16/fp32 step leaves at 1.0, its forecast's start-up (this process's own),
and each eval's time to GPT-2's loss only where the reference curve applies."""

import json
import math
import time
from types import SimpleNamespace

import pytest
import torch

from gpt2repro import compare, forecast, guard, metrics, references, rundir, settings
from gpt2repro.config import TrainConfig
from gpt2repro.engine import make_scaler
from gpt2repro.train import TrainState

try:
    import psutil
except ImportError:  # not a dependency: an extra check where it is installed
    psutil = None


def test_non_finite_values_are_written_as_null(tmp_path):
    log = rundir.MetricsLog(tmp_path / "metrics.jsonl", resume_step=0)
    log.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {
        "step": 1,
        "loss": None,
        "grad_norm": None,
        "lr": 1e-3,
    }


def test_mfu_of_a_float32_run_divides_by_the_tf32_peak():
    h100 = settings.Machine("cuda", gpu_memory_bytes=80e9, gpu_name="NVIDIA H100 80GB HBM3")
    assert settings.settle(TrainConfig(dtype="bfloat16"), h100).peak_tflops == 989.0
    assert settings.settle(TrainConfig(dtype="float32"), h100).peak_tflops == 494.0
    assert settings.settle(TrainConfig(dtype="float32", peak_tflops=100.0), h100).peak_tflops == 100.0
    assert settings.settle(TrainConfig(), settings.Machine("cpu")).peak_tflops == 0.0  # unknown: MFU n/a


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_skipped_step_leaves_the_unit_scale_at_one(dtype):
    scaler = make_scaler(dtype, "cpu")
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    for grad in (math.inf, math.nan, 1.0):
        (scaler.scale(param.sum()) * grad).backward()
        scaler.step(optimizer)  # skipped for inf and nan
        scaler.update()
        optimizer.zero_grad()
        assert scaler.get_scale() == 1.0
    assert torch.all(param < 1.0), "the finite step was taken"


def test_float16_still_backs_off():
    scaler = make_scaler("float16", "cpu")
    before = scaler.get_scale()
    param = torch.nn.Parameter(torch.ones(3))
    (scaler.scale(param.sum()) * math.inf).backward()
    scaler.step(torch.optim.AdamW([param], fused=True))
    scaler.update()
    assert scaler.get_scale() == before / 2


def test_console_line_of_a_checkpoint_only_step():
    line = metrics.format_line({"step": 7, "tokens": 70, "ckpt_s": 1.25}, max_steps=10, eta_s=None)
    assert line == "step      7/10 | ckpt 1.2s"


# ----- the forecast of a real run, and each eval's time to GPT-2's loss (RunLog) -----------------------
LLMC = references.get("llmc-124m-fineweb10B")
LLMC_STEP_500 = (262_144_000, 5.3743)  # llm.c's curve: tokens and val loss at its step 500


def run_log(tmp_path, dataset="fineweb10B", step=0, rank=1, **shape):
    """A RunLog of a GPT-2 124M run judged against llm.c's curve (or of `shape`), resumed at `step`; rank 1
    writes nothing."""
    from gpt2repro.distributed import DistInfo
    from gpt2repro.metrics import RunLog
    from gpt2repro.model import GPT, GPTConfig

    run = SimpleNamespace(
        cfg=TrainConfig(max_steps=2000, gpu_hour_cost=2.0, **shape),
        info=DistInfo(rank=rank, world_size=2),
        comparison=references.Comparison(LLMC, dataset),
        state=TrainState(step=step),
        tokens_per_step=1000,
        raw_model=GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8)),
        run_dir=tmp_path,
    )
    return RunLog(run)


def test_each_eval_projects_the_time_to_the_target_at_the_runs_pace(tmp_path):
    """A GPT-2 124M run on FineWeb inside llm.c's tokens: references.projection's tokens for GPT-2 124M's
    loss, turned into seconds at the run's mean tokens/s; 0 once the loss is reached."""
    log = run_log(tmp_path)
    log.throughput.train_s, log.throughput.steps = 10.0, 100  # 10,000 tokens/s
    assert log.target.name == "gpt2-124m@fineweb"
    # At twice llm.c's tokens of its step 500, the run has that step's loss: it needs 2x llm.c's tokens.
    tokens, loss = 2 * LLMC_STEP_500[0], LLMC_STEP_500[1]
    eta = log.time_to_target(tokens, loss)
    projected = 2 * LLMC.tokens_to_reach(log.target.val_loss)
    assert eta == {"target_eta_s": pytest.approx((projected - tokens) / 10_000, rel=1e-6)}
    assert log.time_to_target(tokens + 1000, 3.40)["target_eta_s"] == 0.0  # below the target: reached


@pytest.mark.parametrize(
    ("dataset", "shape", "tokens", "why"),
    [
        # the 1.66M-parameter Shakespeare model (data of unknown origin), at tokens inside the curve
        (
            None,
            {"n_layer": 4, "n_head": 4, "n_embd": 32},
            LLMC_STEP_500[0],
            "a curve of gpt2-124m, this run's model is a 4-layer, 4-head, 32-wide model",
        ),
        ("openwebtext", {}, LLMC_STEP_500[0], "a curve on fineweb10B, this run's data is openwebtext"),
        ("fineweb10B", {}, 1_000_000, "1.00M tokens lie outside llmc-124m-fineweb10B's curve"),
    ],
)
def test_no_time_to_the_target_where_the_reference_does_not_apply(tmp_path, dataset, shape, tokens, why):
    """A projection only for a run on the curve's dataset, of its model size, inside its tokens; otherwise the
    record and the console line say why there is none."""
    log = run_log(tmp_path, dataset, **shape)
    log.throughput.train_s, log.throughput.steps = 10.0, 100
    fields = log.time_to_target(tokens, LLMC_STEP_500[1])
    assert fields["target_eta_s"] is None and why in fields["target_eta_why"], fields
    record = {"step": 10, "val_loss": LLMC_STEP_500[1], "verdict": "on track", "ref_val_loss": 3.2, "ref_gap": 0.1}
    line = metrics.format_line({**record, **fields}, 100, None, "llmc", log.target.name)
    assert f"no time to {log.target.name}'s loss: " in line and "loss in ~" not in line


def test_the_forecast_gives_no_time_to_the_target_where_the_reference_does_not_apply():

    curve, target = forecast.reference_and_target("llmc-124m-fineweb10B", None)
    small = TrainConfig(n_layer=4, n_head=4, n_embd=32, block_size=64, batch_size=8, max_steps=10**6)
    prediction = forecast.Forecast(small, 1, 0.01, 1.0, 0.0, 0.0, curve, target)
    assert prediction.target_step() is None
    assert "no time to gpt2-124m@fineweb's val loss at llmc-124m-fineweb10B's pace: " in prediction.describe()
    assert "reaches" not in prediction.describe()
    other_data = forecast.Forecast(TrainConfig(), 1, 0.01, 1.0, 0.0, 0.0, curve, target, run_dataset="openwebtext")
    assert other_data.target_step() is None and "this run's data is openwebtext" in other_data.describe()


def test_a_resumed_runs_forecast_starts_at_this_process_not_the_first_launch(tmp_path):
    """After a resume (step 1000 of 2000, launched first a day ago) the start-up is this process's start to the
    end of its first step, and the forecast covers this process's steps: the downtime is neither start-up nor
    GPU-hours."""
    (tmp_path / "started_at").write_text(f"{time.time() - 86_400}\n")  # the run's first launch
    log = run_log(tmp_path, step=1000, rank=0)
    before = time.time()
    log.step_done(1001)
    after = time.time()
    log.throughput.train_s, log.throughput.steps = 9.0, 9  # steps 1002-1010 at 1 s
    forecast = log.forecast(SimpleNamespace(step=1010))
    log.__exit__(None, None, None)
    assert forecast.total_s < 86_400, "the day since the first launch is no part of this launch's time"
    age = metrics.process_age_s()
    assert age is not None, "Linux: the process's start is known"
    # This process started before this test did and no more than `age` seconds ago.
    assert after - before <= forecast.startup_s <= age
    if psutil is not None:  # an independent reading of this process's start
        assert forecast.startup_s == pytest.approx(after - psutil.Process().create_time(), abs=0.5)
    assert forecast.first_step == 1001 and forecast.steps == 1000
    assert forecast.total_s == pytest.approx(forecast.startup_s + 999 * 1.0)
    text = forecast.describe()
    assert "1,000 steps (from step 1,001) at 1.0000 s" in text
    assert f"{forecast.total_s / 3600 * 2:.2f} GPU-hours x $2 = ${forecast.total_s / 3600 * 2 * 2:,.2f}" in text


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_an_update_skipped_as_a_spike_leaves_the_loss_scale_as_it_was(dtype):
    """guard.skip_update under train_step's GradScaler: a spike skips the update without backing the scale off
    (under float16, 30 skips used to take 8192 to 2^-16), even where the spike's own gradients overflowed (a
    poisoned batch under float16: its batch is retried, the scale was not too high for clean data); an overflow on
    a step that is no spike still halves it."""
    scaler = make_scaler(dtype, "cpu")
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)

    def step(grad: float, spike: bool) -> None:
        (scaler.scale(param.sum()) * grad).backward()
        scaler.unscale_(optimizer)
        with guard.skip_update(scaler, optimizer, torch.tensor(spike)):
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()

    step(1.0, spike=False)
    scale, growth, before = scaler.get_scale(), int(scaler._growth_tracker), param.detach().clone()
    for _ in range(30):
        step(1.0, spike=True)
    assert (scaler.get_scale(), int(scaler._growth_tracker)) == (scale, growth)
    assert torch.equal(param.detach(), before), "every spike's update skipped"
    if dtype == "float16":
        step(math.inf, spike=True)
        assert scaler.get_scale() == scale  # the spike's overflow: the scale kept
        step(math.inf, spike=False)
        assert scaler.get_scale() == scale / 2  # an overflow of its own backs off
    step(1.0, spike=False)
    assert not torch.equal(param.detach(), before), "a clean step is taken"


def test_a_rollback_moves_the_records_it_takes_back_aside_and_compare_still_shows_them(tmp_path):
    """A resume drops the records past its checkpoint (they come again, the same); a rollback's are the evidence
    (the spiking losses): moved to metrics.rolled_back.jsonl with the rollback's number, read by compare."""
    path = tmp_path / "metrics.jsonl"
    log = rundir.MetricsLog(path, resume_step=0)
    for step, loss in ((10, 5.0), (20, 4.5), (30, 13.1), (40, 12.8)):
        log.write({"step": step, "tokens": 100 * step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0})
    log.close()
    rundir.MetricsLog(path, resume_step=20, rollback=1).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    aside = [json.loads(line) for line in (tmp_path / rundir.ROLLED_BACK).read_text().splitlines()]
    assert [(r["step"], r["loss"], r["rollback"]) for r in aside] == [(30, 13.1, 1), (40, 12.8, 1)]
    rundir.MetricsLog(path, resume_step=10).close()  # a resume: step 20 comes again, nothing set aside
    assert len((tmp_path / rundir.ROLLED_BACK).read_text().splitlines()) == 2
    run = compare.read_run(tmp_path)
    assert [r["loss"] for r in run.rolled_back] == [13.1, 12.8] and [r["step"] for r in run.steps] == [10]
