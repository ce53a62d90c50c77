"""benchmarks/gpu_check.py's parts that need no GPU and no run: the profile stage on a trace as CUDA writes it,
and the train, resume and eval stages' lines from runs whose val_loss was not finite (processes faked)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_gpu_check():
    """benchmarks/ is no package: the script, imported from its file (its main() does not run)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def _span(name: str, cat: str, ts: int) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": 10}


def _write_trace(run_dir: Path, events: list[dict]) -> None:
    path = run_dir / "profile" / "rank0" / "steps_31-32.pt.trace.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"traceEvents": events}))


# As torch.profiler writes a CUDA run's steps 31-32: each record_function range twice, on the CPU's timeline
# (user_annotation, as on a CPU) and on the GPU's (gpu_user_annotation), around the ops and their kernels.
CUDA_TRACE = [
    _span("step 31", "user_annotation", 0),
    _span("aten::mm", "cpu_op", 1),
    _span("step 31", "gpu_user_annotation", 2),
    _span("sm90_xmma_gemm_bf16bf16_bf16f32", "kernel", 3),
    _span("step 32", "user_annotation", 20),
    _span("aten::mm", "cpu_op", 21),
    _span("step 32", "gpu_user_annotation", 22),
    _span("sm90_xmma_gemm_bf16bf16_bf16f32", "kernel", 23),
]
# As torch 2.13 writes a CPU run's (checked on a trace of gpt2repro.profiling.StepProfiler): CPU-side only.
CPU_TRACE = [e for e in CUDA_TRACE if e["cat"] in ("user_annotation", "cpu_op")]


@pytest.mark.parametrize(
    "events, sizes, line",
    [
        (CUDA_TRACE, "GPU", "step 31, step 32 traced: 2 CUDA kernels"),
        (CPU_TRACE, "SMOKE", "step 31, step 32 traced: 2 CPU ops"),
    ],
)
def test_the_profile_stage_counts_each_traced_step_once(tmp_path, events, sizes, line):
    _write_trace(tmp_path, events)
    stage = gpu_check.profile_stage(tmp_path, getattr(gpu_check, sizes))
    assert stage.ok, stage.lines
    assert stage.lines[0].startswith(line), stage.lines


@pytest.mark.parametrize(
    "events",
    [
        [e for e in CUDA_TRACE if e["cat"] != "kernel"],  # no kernel ran in the traced steps
        [e for e in CUDA_TRACE if e["name"] != "step 32" or e["cat"] == "gpu_user_annotation"],  # a step not traced
    ],
    ids=["no kernels", "step 32 only on the GPU's timeline"],
)
def test_the_profile_stage_fails_a_cuda_trace_without_its_kernels_or_steps(tmp_path, events):
    _write_trace(tmp_path, events)
    assert not gpu_check.profile_stage(tmp_path, gpu_check.GPU).ok


HOW = "--batch_size 8 --compile false"  # how --smoke's eval stage evaluates
MISSING = object()  # no val_loss record at that step at all


def _fake_processes(val_loss_at: dict):
    """gpu_check.timed_run, faked: train.py's runs write metrics.jsonl as the trainer does (a non-finite
    val_loss as null), eval.py writes a loss of 3.25."""

    def timed_run(stage, cmd, timeout, budget):
        out = Path(cmd[cmd.index("--out") + 1])
        if "launch/eval.py" in cmd:
            out.write_text(json.dumps({"loss": 3.25}))
            return subprocess.CompletedProcess(cmd, 0, "", "")
        out.mkdir(parents=True, exist_ok=True)
        last = int(cmd[cmd.index("--max_steps") + 1])
        first = 10 if last == 40 else 50
        records = [{"step": s, "loss": 4.0, "tokens_per_s": 1000.0} for s in range(first, last + 1, 10)]
        for s in range(first, last + 1, 10):
            if s % 20 == 0 and val_loss_at.get(s, 3.25) is not MISSING:
                records.append({"step": s, "val_loss": val_loss_at.get(s, 3.25)})
        with open(out / "metrics.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        resumed = f"resumed from {out / 'checkpoints' / 'step_00000040'}\n" if last == 60 else ""
        return subprocess.CompletedProcess(cmd, 0, resumed, "")

    return timed_run


def _train_resume_eval(tmp_path, monkeypatch, val_loss_at: dict) -> dict:
    monkeypatch.setattr(gpu_check, "timed_run", _fake_processes(val_loss_at))
    stages = gpu_check.train_resume_eval(gpu_check.SMOKE, tmp_path / "data", tmp_path, gpu_check.Budget(600))
    return {stage.name: stage for stage in stages}


def test_runs_with_finite_val_losses_pass_train_resume_and_eval(tmp_path, monkeypatch):
    stages = _train_resume_eval(tmp_path, monkeypatch, {})
    assert stages["train"].ok and stages["resume"].ok and stages["eval"].ok
    assert stages["train"].lines == ["steps up to 40, val_loss 3.2500 at step 40, 1,000 tokens/s at the last log"]
    assert stages["resume"].lines[0].startswith("resumed from step 40, steps up to 60, val_loss 3.2500 at step 60")
    assert stages["eval"].lines == [f"step 60: val_loss 3.250000 ({HOW}) equals the logged 3.250000"]


def test_a_null_val_loss_fails_its_stage_and_the_table_still_comes_out(tmp_path, monkeypatch):
    stages = _train_resume_eval(tmp_path, monkeypatch, {40: None, 60: None})
    assert not stages["train"].ok
    assert stages["train"].lines == ["steps up to 40, val_loss null at step 40, 1,000 tokens/s at the last log"]
    assert not stages["resume"].ok
    assert stages["resume"].lines[0].startswith("resumed from step 40, steps up to 60, val_loss null at step 60")
    assert not stages["eval"].ok
    assert stages["eval"].lines == [f"step 60: val_loss 3.250000 ({HOW}) DIFFERS FROM the logged null"]


def test_a_resume_without_a_val_loss_at_step_60_fails_and_eval_has_nothing_to_equal(tmp_path, monkeypatch):
    stages = _train_resume_eval(tmp_path, monkeypatch, {60: MISSING})
    assert stages["train"].ok
    assert not stages["resume"].ok
    assert stages["resume"].lines[0].startswith("resumed from step 40, steps up to 60, no val_loss at step 60")
    assert not stages["eval"].ok
    assert stages["eval"].lines == [f"step 60: val_loss 3.250000 ({HOW}) DIFFERS FROM the logged null"]


def test_the_resume_stage_prints_the_healthy_z_score_the_guard_saw():
    records = [
        {"step": 10, "loss": 7.0, "spikes": 0, "max_z": 0.0, "max_grad_z": 0.0},
        {"step": 20, "loss": 6.0, "spikes": 0, "max_z": 3.25, "max_grad_z": 6.5},
        {"step": 20, "val_loss": 6.1},
        {"step": 30, "loss": 5.0, "spikes": 1, "max_z": 1.5, "max_grad_z": 2.0},
    ]
    line = gpu_check.guard_line(records, {"spike_zscore": 8.0})
    assert line.startswith("spike guard: largest healthy z-score 3.25 (at the log step 20; threshold 8.0)")
    assert line.endswith("of the grad norm 6.50; 1 updates skipped")
    assert gpu_check.guard_line([{"step": 10, "loss": 7.0}], {"spike_zscore": 0.0}) == "spike guard: no z-score logged"


def test_the_resume_stage_prints_what_a_restart_costs():
    records = [
        {"step": 1, "startup_s": 80.0, "startup_first_step_s": 70.0},
        {"step": 20, "ckpt_s": 0.5, "ckpt_staged_bytes": 1},
        {"step": 21, "ckpt_step": 20, "ckpt_write_s": 6.0, "ckpt_wait_s": 0.0},
        {"step": 41, "startup_s": 12.0, "startup_first_step_s": 3.0},
        {"step": 60, "ckpt_s": 0.25, "ckpt_staged_bytes": 1},
        {"step": 60, "ckpt_step": 60, "ckpt_write_s": 5.0, "ckpt_wait_s": 5.0},
    ]
    assert gpu_check.restart_line(records) == (
        "restart: cold start-up 80.0 s (first step 70.0 s); resumed start-up 12.0 s (first step 3.0 s); "
        "checkpoint stall 0.50 s (median of 2); written in the background in 6.0 s"
    )
    assert gpu_check.restart_line([]) == "restart: no start-up or checkpoint records"
