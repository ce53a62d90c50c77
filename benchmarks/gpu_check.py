"""One prepared check of a GPU machine: throughput, memory, and a real training run with resume and eval.

    bash benchmarks/gpu_check.sh                  # on a GPU: 6 minutes at most (--budget_s), so that a rerun
                                                  # fits in the same 15-minute device session
    bash benchmarks/gpu_check.sh --smoke          # the same stages at toy sizes, on a CPU, in about 3 minutes

Needs only torch, numpy and tiktoken (no datasets, no wandb, no network); FP8 rows need
torchao (a carried wheel will do) and say why they were skipped otherwise. Stages, each a
fresh process as users run them:

  1. data       tiny Shakespeare (shipped in examples/) into token shards, unless --data is given
  2. train      torchrun --nproc_per_node=1 launch/train.py, 40 steps from the shards
  3. profile    steps 31-32 of that run, traced (--profile_steps): the CUDA kernels in the trace
  4. resume     the same command with --max_steps 60: must resume from step 40
  5. eval       launch/eval.py on the newest checkpoint, evaluated as training evaluates (its micro-batch;
                compiled on a GPU): must equal the val_loss logged at step 60
  6. oom        a micro-batch that cannot fit: one `error: out of GPU memory` line naming the allocator
                snapshot it wrote (on a CPU: the host's line; the snapshot is CUDA's)
  6b. tune      launch/train.py --tune true on 124M (no compile, to keep it short): every layout timed, the
                fastest named with its command line, the forecast
  7. speed      benchmarks/train_throughput.py rows: the plain step (full logits + F.cross_entropy,
                its compiled forward outputting the logits, as nanoGPT's), unfused (ours with the
                plain loss: the default on CUDA), fused (the fused loss: flip the CUDA default to it
                if it is at least as fast), fp8 (the default + FP8 matmuls), muon (the default with
                --optimizer muon: its step beside AdamW's), at GPT-2 sizes. A row that fails is a
                FAILED cell; the other rows still run.
  8. memory     the planner's estimate against the measured peak (max_memory_allocated), for each
                row of stage 7 and the layouts it must get right (774M without compile, 1558M FSDP +
                checkpointing)

What must work comes first, the figures after it.
Prints one table; exits 1 if a stage failed (a skipped row is not a failure). --skip speed,memory
reruns only what is left (e.g. after a failure, on a device budget). Past --budget_s the stages not
yet started are skipped, so the table always comes out inside one call.
"""

from __future__ import annotations

import argparse
import json
import pickle
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
    eval=["--batch-size", "16", "--compile", "true"],  # training's micro-batch, compiled as its evaluations
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
    ],  # fmt: skip
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
    eval=["--batch-size", "8", "--compile", "false"],  # as training evaluates on a CPU
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
    ],  # fmt: skip
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


def run(cmd: list[str], timeout: float, budget: Budget) -> subprocess.CompletedProcess:
    """cmd's completed process; one that outlives the budget (or `timeout`) is killed and reported as such."""
    limit = max(1.0, min(timeout, budget.left()))
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"killed after {limit:.0f} s (the check's budget)")


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


def benchmark(stage: Stage, label: str, args: list[str], rows: str, sizes: Sizes, work: Path, budget: Budget):
    """(the rows of one train_throughput.py run, or an error line)."""
    out = work / f"bench_{len(list(work.glob('bench_*')))}.json"
    cmd = torchrun("benchmarks/train_throughput.py", *args, *sizes.bench, "--rows", rows, "--json", str(out))
    proc = timed_run(stage, cmd, 600, budget)
    if proc.returncode:
        return [], f"{label}: {failure(proc)}"
    return json.loads(out.read_text()), ""


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
        results, error = benchmark(stage, label, args, rows, sizes, work, budget)
        if error:
            stage.ok = False
            stage.lines.append(error)
            continue
        if any(r.get("failed") for r in results):  # a row that broke: the others still ran
            stage.ok = False
        ran = [r for r in results if not (r["skipped"] or r.get("failed"))]
        if i < n_speed:
            speed.lines.append(f"{label}: " + " | ".join(_speed_cell(r, ran[0] if ran else None) for r in results))
        if i == 0 and not sizes.cuda:
            memory.lines.append(
                "(a CPU: measured is the whole process's peak RSS, Python and torch included; "
                "the planner counts tensors)"
            )
        for r in ran:
            error = r["planned_bytes"] / r["peak_bytes"] - 1
            memory.lines.append(
                f"{label} {r['name']}: planned {r['planned_bytes'] / GiB:.2f} GiB, measured "
                f"{r['peak_bytes'] / GiB:.2f} GiB ({100 * error:+.0f}%)"
            )
    return [stage for stage in (speed, memory) if stage.name not in skip]


def _speed_cell(row: dict, base: dict | None) -> str:
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
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps_run = [r["step"] for r in records if "loss" in r]
        vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
        last = max(steps_run)
        summary = f"steps up to {last}, val_loss {vals.get(last, float('nan')):.4f} at step {last}"
        if name == "resume":
            resumed = "resumed from" in proc.stdout and str(run_dir / "checkpoints" / "step_00000040") in proc.stdout
            stage.ok = resumed and last == 60
            summary = ("resumed from step 40, " if resumed else "DID NOT RESUME from step 40, ") + summary
        else:
            stage.ok = last == 40
        rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
        stage.lines.append(summary + (f", {rates[-1]:,.0f} tokens/s at the last log" if rates else ""))
        if name == "train":
            stages.append(profile_stage(run_dir, sizes))
    stages.append(eval_stage(sizes, data, run_dir, work, vals[60], budget))
    return stages


def profile_stage(run_dir: Path, sizes: Sizes) -> Stage:
    """What the train stage's trace holds: CUDA kernels on a GPU (CPU ops on a CPU), inside the traced steps."""
    stage = Stage("profile")
    trace = run_dir / "profile" / "rank0" / "steps_{}-{}.pt.trace.json".format(*PROFILED)
    if not trace.exists():
        stage.ok, stage.lines = False, [f"FAILED: no trace at {trace}"]
        return stage
    events = json.loads(trace.read_text())["traceEvents"]
    steps = sorted(e["name"] for e in events if e.get("name", "").startswith("step "))
    kind = "kernel" if sizes.cuda else "cpu_op"
    found = sum(1 for e in events if e.get("cat") == kind)
    stage.ok = steps == [f"step {n}" for n in PROFILED] and found > 0
    what = "CUDA kernels" if sizes.cuda else "CPU ops (a CPU has no CUDA kernels)"
    stage.lines.append(f"{', '.join(steps) or 'no steps'} traced: {found:,} {what} in {trace}")
    return stage


def eval_stage(sizes: Sizes, data: Path, run_dir: Path, work: Path, logged: float, budget: Budget) -> Stage:
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
    # The same computation as training's evaluation (its micro-batch, compiled on a GPU): equal to rounding.
    stage.ok = abs(result["loss"] - logged) <= 1e-6 * abs(logged)
    verdict = "equals" if stage.ok else "DIFFERS FROM"
    how = " ".join(sizes.eval)
    stage.lines.append(f"step 60: val_loss {result['loss']:.6f} ({how}) {verdict} the logged {logged:.6f}")
    return stage


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
    # What must work first (a real run, its resume, eval and out-of-memory report), then the figures.
    if stages[0].ok and "train" not in skip:
        stages += train_resume_eval(sizes, data, work, budget)
    if stages[0].ok and "oom" not in skip:
        stages.append(oom_stage(sizes, data, work, budget))
    if stages[0].ok and "tune" not in skip:
        stages.append(tune_stage(sizes, data, work, budget))
    stages += speed_and_memory(sizes, work, skip, budget)

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
