"""One prepared check of a GPU machine: throughput, memory, and a real training run with resume and eval.

    bash benchmarks/gpu_check.sh                  # on a GPU: 6 minutes at most (--budget_s), so that a rerun
                                                  # fits in the same 15-minute device session
    bash benchmarks/gpu_check.sh --smoke          # the same stages at toy sizes, on a CPU, in about 3 minutes

Needs only torch, numpy and tiktoken (no datasets, no wandb, no network); FP8 rows need
torchao (a carried wheel will do) and say why they were skipped otherwise. Stages, each a
fresh process as users run them, in this order:

  1. data       tiny Shakespeare (shipped in examples/) into token shards, unless --data is given
  2. speed      benchmarks/train_throughput.py rows: the plain step (full logits + F.cross_entropy,
                its compiled forward outputting the logits, as nanoGPT's), unfused (ours with the
                plain loss: the default on CUDA), fused (the fused loss: flip the CUDA default to it
                if it is at least as fast), fp8 (the default + FP8 matmuls), muon (the default with
                --optimizer muon: its step beside AdamW's), at GPT-2 sizes. A row that fails is a
                FAILED cell; the other rows still run.
  3. memory     the planner's estimate against the measured peak (max_memory_allocated), for each
                row of stage 2 and the layouts it must get right (774M without compile, 1558M FSDP +
                checkpointing)
  4. oom        a micro-batch that cannot fit: one `error: out of GPU memory` line naming the allocator
                snapshot it wrote (on a CPU: the host's line; the snapshot is CUDA's)
  5. train      torchrun --nproc_per_node=1 launch/train.py, 40 steps from the shards
  6. profile    steps 31-32 of that run, traced (--profile_steps): the CUDA kernels in the trace
  7. resume     the same command with --max_steps 60: must resume from step 40; its lines give the spike
                guard's healthy z-score and what a restart costs (start-up cold and resumed with the compile
                cache, checkpoint stall against background write)
  8. eval       launch/eval.py on the newest checkpoint, evaluated as training evaluates (its micro-batch;
                compiled on a GPU): must equal the val_loss logged at step 60
  9. tune       launch/train.py --tune true on 124M (no compile, to keep it short): every layout timed, the
                fastest named with its command line, the forecast

Why this order: the figures come first because only a GPU can give them, while every stage is run on a CPU
by the smoke test (tests/distributed/test_gpu_check.py) on each change; and a GPU is lent for minutes, so
what comes back from a cut call must be the figures. The cold 124M compiles of train, resume, eval (and
tune's layouts) take most of a budget; ahead of the speed rows they left them little of it. Then oom
(seconds, and its snapshot is CUDA's only), then train and what needs its run, and tune last (the longest).
Each benchmark run has its own bound (on a GPU 130 s for a speed run, 45 s for a memory run: with the data
stage they fill the 360 s budget at worst), so that one slow compile cannot eat the others' time; a run cut
by its bound or by the budget shows the rows it had measured (train_throughput.py writes each row as it ends)
and is marked cut.

Prints one table, its stages in the order above; exits 1 if a stage failed or a run was cut (a skipped row
or stage is not a failure). --skip speed,memory reruns only what is left (e.g. after a call that the budget
cut: on a GPU that is usually train to tune). Past --budget_s the stages not yet started are skipped, so the
table always comes out inside one call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3


@dataclass
class Stage:
    name: str
    lines: list[str] = field(default_factory=list)
    ok: bool = True
    seconds: float = 0.0


@dataclass(frozen=True)
class Sizes:
    """What the stages run: GPT-2 sizes on a GPU, toy ones for --smoke."""

    speed: list[tuple[str, list[str], str]]  # (label, benchmark arguments, rows)
    memory: list[tuple[str, list[str]]]  # (label, torchrun benchmark arguments): one 'ours' row each
    train: list[str]
    bench: list[str]
    eval: list[str]  # launch/eval.py's arguments that make it evaluate as training does
    oom: list[str]  # launch/train.py's arguments for a micro-batch that cannot fit
    tune: list[str]  # launch/train.py's arguments for a short --tune true
    cuda: bool = True
    # Each benchmark run's bound, so that one (a slow compile) cannot eat the budget of the runs after it.
    speed_bound_s: float = 600.0
    memory_bound_s: float = 600.0


GPU = Sizes(
    speed=[
        ("124M bf16 b16", ["--preset", "gpt2-124m", "--batch_size", "16"], "plain,unfused,fused,fp8,muon"),
        ("774M bf16 b8", ["--preset", "gpt2-774m", "--batch_size", "8"], "unfused,fused,fp8"),
    ],
    memory=[
        ("774M b8, no compile", ["--preset", "gpt2-774m", "--batch_size", "8", "--compile", "false"]),
        (
            "1558M b8 FSDP + act. ckpt",
            ["--preset", "gpt2-1558m", "--batch_size", "8", "--strategy", "fsdp", "--activation_checkpointing", "true"],
        ),
    ],
    train=[
        "--config",
        "gpt2-124m",
        "--batch_size",
        "16",
        "--total_batch_tokens",
        "16384",
        "--warmup_steps",
        "10",
        "--eval_tokens",
        "16384",
        "--dtype",
        "bfloat16",
    ],
    bench=["--dtype", "bfloat16", "--compile", "true", "--steps", "10", "--warmup", "3"],
    eval=["--batch_size", "16", "--compile", "true"],  # training's micro-batch, compiled as its evaluations
    # 4096 x 1024 tokens of 50304 fp32 logits: 800 GiB, on any GPU.
    oom=["--config", "gpt2-124m", "--batch_size", "4096", "--compile", "false", "--fused_loss", "false"],
    tune=[
        "--config",
        "gpt2-124m",
        "--batch_size",
        "32",
        "--total_batch_tokens",
        "32768",
        "--compile",
        "false",
        "--max_steps",
        "1000",
        "--eval_tokens",
        "65536",
        "--tune_steps",
        "3",
        "--tune_warmup",
        "2",
    ],
    # Estimates on an H100: a speed run ~100-130 s (a cold compile of each row but fp8's, muon's from the cache),
    # a memory run ~20-40 s (no compile). With the data stage these fill the 360 s budget at worst.
    speed_bound_s=130.0,
    memory_bound_s=45.0,
)
_TOY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64"]
SMOKE = Sizes(
    speed=[
        ("toy b4", [*_TOY, "--batch_size", "4"], "plain,unfused,fused,fp8,muon"),  # every row kind, once
    ],
    memory=[
        (
            "toy FSDP + act. ckpt",
            [*_TOY, "--batch_size", "4", "--strategy", "fsdp", "--activation_checkpointing", "true"],
        )
    ],
    train=[
        "--config",
        "shakespeare-cpu",
        "--n_layer",
        "2",
        "--n_embd",
        "32",
        "--block_size",
        "64",
        "--batch_size",
        "8",
        "--warmup_steps",
        "10",
        "--eval_tokens",
        "4096",
        "--device",
        "cpu",
    ],
    bench=["--dtype", "float32", "--compile", "false", "--steps", "3", "--warmup", "1"],
    eval=["--batch_size", "8", "--compile", "false"],  # as training evaluates on a CPU
    # 20000 x 32 tokens of 50304 fp32 logits at once: 120 GiB, more than any CPU host here will allocate; the
    # layers before them are small, so that it fails at once.
    oom=[
        "--config",
        "shakespeare-cpu",
        "--n_layer",
        "1",
        "--n_head",
        "2",
        "--n_embd",
        "16",
        "--block_size",
        "32",
        "--batch_size",
        "20000",
        "--fused_loss",
        "false",
        "--device",
        "cpu",
    ],
    tune=[
        "--config",
        "shakespeare-cpu",
        *_TOY,
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--max_steps",
        "100",
        "--tune_steps",
        "1",
        "--tune_warmup",
        "1",
    ],
    cuda=False,
)


class Budget:
    """The check's time: each subprocess gets what is left (at most its own bound), and a stage that would
    start past the budget is skipped, so that the table comes out inside one call."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def skips(self, stage: Stage, what: str = "") -> bool:
        """Whether the budget is spent; if so, stage says that `what` (or the stage) was skipped."""
        if self.left() > 0:
            return False
        stage.lines.append(
            f"{what}: skipped (past the check's budget)" if what else "skipped (past the check's budget)"
        )
        return True


CUT = 124  # run()'s exit code for a process it killed: past its bound or the check's budget
STOP_GRACE_S = 15.0  # from SIGTERM to SIGKILL


def run(cmd: list[str], timeout: float, budget: Budget) -> subprocess.CompletedProcess:
    """cmd's completed process; one that outlives the budget (or `timeout`) is stopped, with its children, and
    comes back with exit code CUT, the reason as the last line of its stderr."""
    limit = max(1.0, min(timeout, budget.left()))
    why = f"its bound of {timeout:.0f} s" if timeout <= budget.left() else "the check's budget"
    # A session of its own, so that stopping it reaches every process it started.
    with subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired as timeout_expired:
            out, err = _stop(proc, timeout_expired)
            return subprocess.CompletedProcess(cmd, CUT, out, f"{err}\nkilled after {limit:.0f} s ({why})")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop(proc: subprocess.Popen, pending: subprocess.TimeoutExpired) -> tuple[str, str]:
    """Its output so far, once it has been stopped. SIGTERM first: torchrun's workers sit in sessions of
    their own, out of reach of the group's signals, and torchrun passes a SIGTERM on to them (a SIGKILL would
    leave them holding the GPU for the stages after it). SIGKILL if it is still there after STOP_GRACE_S."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired as e:
        pending = e
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()  # not communicate(): a straggler outside the group may hold the pipes open
    return _text(pending.stdout), _text(pending.stderr)


def _text(output: bytes | str | None) -> str:
    """A TimeoutExpired's output (bytes, even with text=True) as text."""
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def timed_run(stage: Stage, cmd: list[str], timeout: float, budget: Budget) -> subprocess.CompletedProcess:
    """run(), its seconds added to the stage's."""
    started = time.perf_counter()
    proc = run(cmd, timeout, budget)
    stage.seconds += time.perf_counter() - started
    return proc


def failure(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return f"FAILED (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"


def torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script, *args]


def prepare(data: Path, stage: Stage, budget: Budget) -> None:
    if (data / "manifest.json").exists():
        stage.lines.append(f"using the prepared shards in {data}")
        return
    cmd = [sys.executable, "data_prep/prepare.py", "--out", str(data), "--files", "examples/tinyshakespeare.txt"]
    proc = run(cmd, 300, budget)
    if proc.returncode:
        stage.ok, stage.lines = False, [failure(proc)]
        return
    manifest = json.loads((data / "manifest.json").read_text())
    tokens = {split: info["num_tokens"] for split, info in manifest["splits"].items()}
    stage.lines.append(f"tiny Shakespeare: {tokens['train']:,} train and {tokens['val']:,} val tokens in {data}")


def benchmark(
    stage: Stage, label: str, args: list[str], rows: str, sizes: Sizes, work: Path, budget: Budget, bound_s: float
) -> tuple[list[dict], str]:
    """The rows of one train_throughput.py run, and an error line if it did not end well. A run that was cut
    (its bound, the budget) or crashed still gives the rows it had measured (it writes each as it ends); the
    rows it did not get to come back marked "cut"."""
    out = work / f"bench_{len(list(work.glob('bench_*')))}.json"
    cmd = torchrun("benchmarks/train_throughput.py", *args, *sizes.bench, "--rows", rows, "--json", str(out))
    proc = timed_run(stage, cmd, bound_s, budget)
    measured = _read_rows(out)
    if proc.returncode == 0:
        return measured, ""
    names = {r["name"] for r in measured}
    left = [{"name": name, "skipped": "", "cut": True} for name in rows.split(",") if name not in names]
    how = "run cut" if proc.returncode == CUT else "run ended"
    counted = f"{len(measured)} of {len(measured) + len(left)} rows measured"
    return measured + left, f"{label}: {how}, {counted}: {failure(proc)}"


def _read_rows(path: Path) -> list[dict]:
    """The rows a train_throughput.py run wrote (none if it wrote none, or not JSON: a version that wrote it
    at exit only, killed while writing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def speed_and_memory(sizes: Sizes, work: Path, skip: set[str], budget: Budget) -> list[Stage]:
    """The speed rows (and their memory lines), then the memory-only layouts; skipped stages are left out."""
    speed, memory = Stage("speed"), Stage("memory")
    runs = [(label, args, rows) for label, args, rows in sizes.speed if "speed" not in skip]
    n_speed = len(runs)
    runs += [(label, args, "ours") for label, args in sizes.memory if "memory" not in skip]
    for i, (label, args, rows) in enumerate(runs):
        stage = speed if i < n_speed else memory
        if budget.skips(stage, label):
            continue
        bound_s = sizes.speed_bound_s if i < n_speed else sizes.memory_bound_s
        results, error = benchmark(stage, label, args, rows, sizes, work, budget, bound_s)
        if error or any(r.get("failed") for r in results):  # a row that broke (or a cut run): the others stand
            stage.ok = False
        ran = [r for r in results if _measured(r)]
        if i < n_speed and results:
            speed.lines.append(f"{label}: " + " | ".join(_speed_cell(r, ran[0] if ran else None) for r in results))
        if error:
            stage.lines.append(error)
        if i == 0 and not sizes.cuda:
            memory.lines.append(
                "(a CPU: measured is the whole process's peak RSS, Python and torch included; "
                "the planner counts tensors)"
            )
        for r in ran:
            off = r["planned_bytes"] / r["peak_bytes"] - 1
            memory.lines.append(
                f"{label} {r['name']}: planned {r['planned_bytes'] / GiB:.2f} GiB, measured "
                f"{r['peak_bytes'] / GiB:.2f} GiB ({100 * off:+.0f}%)"
            )
    return [stage for stage in (speed, memory) if stage.name not in skip]


def _measured(row: dict) -> bool:
    return not (row["skipped"] or row.get("failed") or row.get("cut"))


def _speed_cell(row: dict, base: dict | None) -> str:
    if row.get("cut"):
        return f"{row['name']} CUT (not measured before the run ended)"
    if row.get("failed"):
        return f"{row['name']} FAILED ({row['failed']})"
    if row["skipped"]:
        return f"{row['name']} skipped ({row['skipped'].split(';')[0]})"
    ratio = f" ({row['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if base is not row else ""
    mfu = f", MFU {100 * row['mfu']:.0f}%" if row["mfu"] else ""
    return f"{row['name']} {row['tokens_per_s']:,.0f} tok/s{ratio}{mfu}"


PROFILED = (31, 32)  # steps of the train stage that are traced


def train_resume_eval(sizes: Sizes, data: Path, work: Path, budget: Budget) -> list[Stage]:
    run_dir = work / "run"
    common = [
        *sizes.train,
        "--data",
        str(data),
        "--out",
        str(run_dir),
        "--log_interval",
        "10",
        "--eval_interval",
        "20",
        "--ckpt_interval",
        "20",
    ]
    stages = []
    for name, steps in (("train", 40), ("resume", 60)):
        stage = Stage(name)
        stages.append(stage)
        if budget.skips(stage):
            return stages
        profiled = ["--profile_steps", "{}:{}".format(*PROFILED)] if name == "train" else []
        cmd = torchrun("launch/train.py", *common, "--max_steps", str(steps), *profiled)
        proc = timed_run(stage, cmd, 600, budget)
        if proc.returncode:
            stage.ok, stage.lines = False, [failure(proc)]
            return stages
        records = read_metrics(run_dir)
        last, summary = summarise_run(records)
        # A run that reached its step with a finite val_loss there (a null one is a diverged run).
        stage.ok = last == steps and finite(val_losses(records).get(last))
        if name == "resume":
            resumed = "resumed from" in proc.stdout and str(run_dir / "checkpoints" / "step_00000040") in proc.stdout
            stage.ok = stage.ok and resumed
            summary = ("resumed from step 40, " if resumed else "DID NOT RESUME from step 40, ") + summary
        stage.lines.append(summary)
        if name == "resume":
            config = run_dir / "config.json"
            stage.lines.append(guard_line(records, json.loads(config.read_text()) if config.is_file() else {}))
            stage.lines.append(restart_line(records))
        if name == "train":
            stages.append(profile_stage(run_dir, sizes))
    stages.append(eval_stage(sizes, data, run_dir, work, val_losses(records).get(60), budget))
    return stages


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (none if it wrote none)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def val_losses(records: list[dict]) -> dict[int, float | None]:
    """Each evaluated step's val_loss: None where it was not finite (metrics.jsonl writes NaN and inf as null)."""
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def loss_text(value, digits: int = 4) -> str:
    """A loss for the table, which must come out whatever one row holds: a null (or absent) one says so."""
    return f"{value:.{digits}f}" if finite(value) else f"{value} (not finite)" if value is not None else "null"


def summarise_run(records: list[dict]) -> tuple[int | None, str]:
    """A run's last logged step (None if none) and its line: the val_loss there and the last tokens/s."""
    steps = [r["step"] for r in records if "loss" in r]
    if not steps:
        return None, "no steps in metrics.jsonl"
    last = max(steps)
    vals = val_losses(records)
    val = f"val_loss {loss_text(vals[last])} at step {last}" if last in vals else f"no val_loss at step {last}"
    rates = [r["tokens_per_s"] for r in records if finite(r.get("tokens_per_s"))]
    return last, f"steps up to {last}, {val}" + (f", {rates[-1]:,.0f} tokens/s at the last log" if rates else "")


def guard_line(records: list[dict], config: dict) -> str:
    """What the spike guard (on by default) saw in the healthy train and resume runs: the largest z-score of the
    steps it judged, against the run's threshold (config.json's), and what it skipped."""
    judged = [r for r in records if "max_z" in r]
    if not judged:
        return "spike guard: no z-score logged"
    largest = max(judged, key=lambda r: r["max_z"])
    grad_z = max(r.get("max_grad_z", 0.0) for r in judged)
    threshold = config.get("spike_zscore", "unknown")
    return (
        f"spike guard: largest healthy z-score {largest['max_z']:.2f} (at the log step {largest['step']}; "
        f"threshold {threshold}), of the grad norm {grad_z:.2f}; {judged[-1].get('spikes', 0)} updates "
        "skipped"
    )


def restart_line(records: list[dict]) -> str:
    """What a restart costs, from the train and resume runs' records: each launch's start-up (the resume loads
    the compiled graphs the train launch left in RUN_DIR/compile_cache), and what a checkpoint stopped training
    for (written in the background: its staging copy) against the time it took to write."""
    starts = [r for r in records if "startup_s" in r]
    parts = [
        f"{name} start-up {r['startup_s']:.1f} s (first step {r.get('startup_first_step_s', 0.0):.1f} s)"
        for name, r in zip(("cold", "resumed"), starts[:1] + starts[1:][-1:], strict=False)
    ]
    stalls = sorted(r["ckpt_s"] for r in records if "ckpt_s" in r)
    writes = sorted(r["ckpt_write_s"] for r in records if "ckpt_write_s" in r)
    if stalls:
        parts.append(f"checkpoint stall {stalls[len(stalls) // 2]:.2f} s (median of {len(stalls)})")
    if writes:
        parts.append(f"written in the background in {writes[len(writes) // 2]:.1f} s")
    return "restart: " + ("; ".join(parts) if parts else "no start-up or checkpoint records")


def profile_stage(run_dir: Path, sizes: Sizes) -> Stage:
    """What the train stage's trace holds: CUDA kernels on a GPU (CPU ops on a CPU), inside the traced steps."""
    stage = Stage("profile")
    trace = run_dir / "profile" / "rank0" / "steps_{}-{}.pt.trace.json".format(*PROFILED)
    if not trace.exists():
        stage.ok, stage.lines = False, [f"FAILED: no trace at {trace}"]
        return stage
    events = json.loads(trace.read_text())["traceEvents"]
    steps = traced_steps(events)
    kind = "kernel" if sizes.cuda else "cpu_op"
    found = sum(1 for e in events if e.get("cat") == kind)
    stage.ok = steps == [f"step {n}" for n in PROFILED] and found > 0
    what = "CUDA kernels" if sizes.cuda else "CPU ops (a CPU has no CUDA kernels)"
    stage.lines.append(f"{', '.join(steps) or 'no steps'} traced: {found:,} {what} in {trace}")
    return stage


def traced_steps(events: list[dict]) -> list[str]:
    """The names of the trace's "step N" ranges (StepProfiler's record_function), one per step: the CPU-side
    ones (cat "user_annotation"). On CUDA each range is also on the GPU's timeline, as a "gpu_user_annotation"
    event of the same name (torch's own profiler tests drop those for this reason)."""
    names = (e.get("name", "") for e in events if e.get("cat") == "user_annotation")
    return sorted(name for name in names if name.startswith("step "))


def eval_stage(sizes: Sizes, data: Path, run_dir: Path, work: Path, logged: float | None, budget: Budget) -> Stage:
    """launch/eval.py on the run's newest checkpoint: its loss must equal `logged`, the val_loss logged at step 60
    (None where it is null or absent: then there is nothing to compare with, a failure)."""
    stage = Stage("eval")
    if budget.skips(stage):
        return stage
    result_file = work / "eval.json"
    cmd = [
        sys.executable,
        "launch/eval.py",
        "--ckpt",
        str(run_dir),
        "--data",
        str(data),
        "--out",
        str(result_file),
        *sizes.eval,
    ]
    proc = timed_run(stage, cmd, 300, budget)
    if proc.returncode:
        stage.ok, stage.lines = False, [failure(proc)]
        return stage
    result = json.loads(result_file.read_text())
    stage.ok, line = eval_verdict(result.get("loss"), logged, " ".join(sizes.eval))
    stage.lines.append(line)
    return stage


def eval_verdict(loss: float | None, logged: float | None, how: str) -> tuple[bool, str]:
    """Whether eval.py's loss equals the logged one, and the line that says so."""
    # The same computation as training's evaluation (its micro-batch, compiled on a GPU): equal to rounding.
    ok = finite(loss) and finite(logged) and abs(loss - logged) <= 1e-6 * abs(logged)
    verdict = "equals" if ok else "DIFFERS FROM"
    return ok, f"step 60: val_loss {loss_text(loss, 6)} ({how}) {verdict} the logged {loss_text(logged, 6)}"


def oom_stage(sizes: Sizes, data: Path, work: Path, budget: Budget) -> Stage:
    """A run that cannot fit: one error line; on CUDA it names the allocator snapshot, which must load."""
    stage = Stage("oom")
    if budget.skips(stage):
        return stage
    run_dir = work / "oom"
    cmd = [sys.executable, "launch/train.py", *sizes.oom, "--data", str(data), "--out", str(run_dir)]
    proc = timed_run(stage, [*cmd, "--max_steps", "1"], 300, budget)
    # One error line (a library's warnings may stand beside it on stderr), the out-of-memory one.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    where = "GPU" if sizes.cuda else "host"
    stage.ok = proc.returncode == 1 and len(errors) == 1 and errors[0].startswith(f"error: out of {where} memory")
    snapshot = run_dir / "profile" / "rank0" / "oom_memory_snapshot.pickle"
    if sizes.cuda:
        try:
            with open(snapshot, "rb") as f:
                segments = len(pickle.load(f)["segments"])
            stage.lines.append(f"snapshot {snapshot}: {segments} segments")
        except (OSError, pickle.UnpicklingError, KeyError, EOFError) as e:
            stage.ok = False
            stage.lines.append(f"FAILED: no loadable snapshot at {snapshot} ({e})")
        stage.ok = stage.ok and any(str(snapshot) in line for line in errors)
    stage.lines.insert(0, (errors[-1] if errors else failure(proc))[:300])
    return stage


def tune_stage(sizes: Sizes, data: Path, work: Path, budget: Budget) -> Stage:
    """--tune true: it must end cleanly with the fastest layout that fits, its command and the forecast."""
    stage = Stage("tune")
    if budget.skips(stage):
        return stage
    cmd = [sys.executable, "launch/train.py", *sizes.tune, "--data", str(data), "--out", str(work / "tuned")]
    proc = timed_run(stage, [*cmd, "--tune", "true"], 600, budget)
    lines = proc.stdout.splitlines()
    chosen = [line for line in lines if line.startswith("fastest that fits:")]
    forecast = [line for line in lines if line.startswith("forecast for this launch")]
    stage.ok = proc.returncode == 0 and len(chosen) == 1 and len(forecast) == 1 and not (work / "tuned").exists()
    stage.lines = [*chosen, *(line[:300] for line in forecast)] if stage.ok else [failure(proc)]
    trials = [line for line in lines if " micro " in line]
    stage.lines.append(f"{len(trials)} layouts: " + "; ".join(" ".join(t.split()) for t in trials)[:600])
    return stage


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes, on a CPU, to check that every stage works")
    p.add_argument("--data", help="prepared shards (default: tiny Shakespeare, prepared into --work)")
    p.add_argument("--work", help="where shards, runs and results go (default: a new temporary directory)")
    p.add_argument("--skip", default="", help="stages to leave out, comma-separated: speed, memory, train, oom, tune")
    p.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="stages not started by then are skipped (default on a GPU: 360, so that a rerun fits in the same device "
        "session; --smoke: none)",
    )
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"speed", "memory", "train", "oom", "tune"}:
        p.error(f"--skip takes speed, memory, train, oom, tune; got {args.skip}")
    sizes = SMOKE if args.smoke else GPU
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else work / "data"
    budget_s = args.budget_s if args.budget_s is not None else (float("inf") if args.smoke else 360.0)
    started, budget = time.perf_counter(), Budget(budget_s)

    stages = [Stage("data")]
    prepare(data, stages[0], budget)
    # The figures first, then what must work (the order's reasons: the docstring). Speed and memory need no data.
    stages += speed_and_memory(sizes, work, skip, budget)
    if stages[0].ok and "oom" not in skip:
        stages.append(oom_stage(sizes, data, work, budget))
    if stages[0].ok and "train" not in skip:
        stages += train_resume_eval(sizes, data, work, budget)
    if stages[0].ok and "tune" not in skip:
        stages.append(tune_stage(sizes, data, work, budget))

    import torch  # only for the header: the stages ran in their own processes

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    minutes = (time.perf_counter() - started) / 60
    print(
        f"gpu_check{' --smoke' if args.smoke else ''} on {device}, torch {torch.__version__}: {minutes:.1f} min; "
        f"results in {work}"
    )
    for stage in stages:
        status = "ok" if stage.ok else "FAILED"
        for i, line in enumerate(stage.lines or [""]):
            head = f"{stage.name:<7} {status:<6} {stage.seconds:>5.0f}s" if i == 0 else ""
            print(f"{head:<21} {line}")
    return 0 if all(stage.ok for stage in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
