"""What a run writes about itself: strict JSON in metrics.jsonl, MFU against the right peak,
and a GradScaler that a skipped bf16/fp32 step leaves at 1.0."""

import json
import math

import pytest
import torch

from gpt2repro import metrics, settings
from gpt2repro.config import TrainConfig
from gpt2repro.train import make_scaler


def test_non_finite_values_are_written_as_null(tmp_path):
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", resume_step=0)
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
