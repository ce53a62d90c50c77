"""One prepared check of a GPU machine: throughput, memory, and a real training run with resume and eval.

    bash benchmarks/gpu_check.sh                  # on a GPU: under 8 minutes on an H100/H200
    bash benchmarks/gpu_check.sh --smoke          # the same stages at toy sizes, on a CPU, in about 2 minutes

Needs only torch, numpy and tiktoken (no datasets, no wandb, no network); FP8 rows need
torchao (a carried wheel will do) and say why they were skipped otherwise. Stages, each a
fresh process as users run them:

  1. data       tiny Shakespeare (shipped in examples/) into token shards, unless --data is given
  2. speed      benchmarks/train_throughput.py rows: the plain step (full logits + F.cross_entropy,
                its compiled forward outputting the logits, as nanoGPT's), unfused (ours with the
                plain loss: the default on CUDA), fused (the fused loss: flip the CUDA default to it
                if it is at least as fast), fp8 (the default + FP8 matmuls), at GPT-2 sizes
  3. memory     the planner's estimate against the measured peak, for each row of stage 2 and
                the layouts it must get right (774M without compile, 1558M FSDP + checkpointing)
  4. train      torchrun --nproc_per_node=1 launch/train.py, 40 steps from the shards
  5. resume     the same command with --max_steps 60: must resume from step 40
  6. eval       launch/eval.py on the newest checkpoint: must equal the val_loss logged at step 60

Prints one table; exits 1 if a stage failed (a skipped row is not a failure). --skip speed,memory
reruns only what is left (e.g. after a failure, on a device budget).
"""

from __future__ import annotations

import argparse
import json
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
    cuda: bool = True


GPU = Sizes(
    speed=[
        ("124M bf16 b16", ["--preset", "gpt2-124m", "--batch_size", "16"], "plain,unfused,fused,fp8"),
        ("124M bf16 b32", ["--preset", "gpt2-124m", "--batch_size", "32"], "plain,unfused,fused"),
        ("774M bf16 b8", ["--preset", "gpt2-774m", "--batch_size", "8"], "unfused,fused,fp8"),
    ],
    memory=[
        ("774M b8, no compile", ["--preset", "gpt2-774m", "--batch_size", "8", "--compile", "false"]),
        (
            "1558M b8 FSDP + act. ckpt",
            ["--preset", "gpt2-1558m", "--batch_size", "8", "--strategy", "fsdp", "--activation_checkpointing", "true"],
        ),
    ],  # fmt: skip
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
    ],  # fmt: skip
    bench=["--dtype", "bfloat16", "--compile", "true", "--steps", "10", "--warmup", "3"],
)
_TOY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64"]
SMOKE = Sizes(
    speed=[
        ("toy b4", [*_TOY, "--batch_size", "4"], "plain,unfused,fused,fp8"),
        ("toy b8", [*_TOY, "--batch_size", "8"], "plain,unfused,fused"),
    ],
    memory=[
        (
            "toy FSDP + act. ckpt",
            [*_TOY, "--batch_size", "4", "--strategy", "fsdp", "--activation_checkpointing", "true"],
        )
    ],  # fmt: skip
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
    ],  # fmt: skip
    bench=["--dtype", "float32", "--compile", "false", "--steps", "3", "--warmup", "1"],
    cuda=False,
)


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def failure(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return f"FAILED (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"


def torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script, *args]


def prepare(data: Path, stage: Stage) -> None:
    if (data / "manifest.json").exists():
        stage.lines.append(f"using the prepared shards in {data}")
        return
    cmd = [sys.executable, "data_prep/prepare.py", "--out", str(data), "--files", "examples/tinyshakespeare.txt"]
    proc = run(cmd, timeout=300)
    if proc.returncode:
        stage.ok, stage.lines = False, [failure(proc)]
        return
    manifest = json.loads((data / "manifest.json").read_text())
    tokens = {split: info["num_tokens"] for split, info in manifest["splits"].items()}
    stage.lines.append(f"tiny Shakespeare: {tokens['train']:,} train and {tokens['val']:,} val tokens in {data}")


def benchmark(label: str, args: list[str], rows: str, sizes: Sizes, work: Path) -> tuple[list[dict], str]:
    """The rows of one train_throughput.py run, or an error line."""
    out = work / f"bench_{len(list(work.glob('bench_*')))}.json"
    cmd = torchrun("benchmarks/train_throughput.py", *args, *sizes.bench, "--rows", rows, "--json", str(out))
    proc = run(cmd, timeout=600)
    if proc.returncode:
        return [], f"{label}: {failure(proc)}"
    return json.loads(out.read_text()), ""


def speed_and_memory(sizes: Sizes, work: Path, skip: set[str]) -> list[Stage]:
    """The speed rows (and their memory lines), then the memory-only layouts; skipped stages are left out."""
    speed, memory = Stage("speed"), Stage("memory")
    runs = [(label, args, rows) for label, args, rows in sizes.speed if "speed" not in skip]
    n_speed = len(runs)
    runs += [(label, args, "ours") for label, args in sizes.memory if "memory" not in skip]
    for i, (label, args, rows) in enumerate(runs):
        started = time.perf_counter()
        results, error = benchmark(label, args, rows, sizes, work)
        if error:
            stage = speed if i < n_speed else memory
            stage.ok = False
            stage.lines.append(error)
            continue
        ran = [r for r in results if not r["skipped"]]
        if i < n_speed:
            speed.lines.append(f"{label}: " + " | ".join(_speed_cell(r, ran[0] if ran else None) for r in results))
            speed.seconds += time.perf_counter() - started
        else:
            memory.seconds += time.perf_counter() - started
        if i == 0 and not sizes.cuda:
            memory.lines.append("(a CPU: measured is the whole process's peak RSS, Python and torch included; "
                                "the planner counts tensors)")  # fmt: skip
        for r in ran:
            error = r["planned_bytes"] / r["peak_bytes"] - 1
            memory.lines.append(f"{label} {r['name']}: planned {r['planned_bytes'] / GiB:.2f} GiB, measured "
                                f"{r['peak_bytes'] / GiB:.2f} GiB ({100 * error:+.0f}%)")  # fmt: skip
    return [stage for stage in (speed, memory) if stage.name not in skip]


def _speed_cell(row: dict, base: dict | None) -> str:
    if row["skipped"]:
        return f"{row['name']} skipped ({row['skipped'].split(';')[0]})"
    ratio = f" ({row['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if base is not row else ""
    mfu = f", MFU {100 * row['mfu']:.0f}%" if row["mfu"] else ""
    return f"{row['name']} {row['tokens_per_s']:,.0f} tok/s{ratio}{mfu}"


def train_resume_eval(sizes: Sizes, data: Path, work: Path) -> list[Stage]:
    run_dir = work / "run"
    common = [*sizes.train, "--data", str(data), "--out", str(run_dir), "--log_interval", "10",
              "--eval_interval", "20", "--ckpt_interval", "20"]  # fmt: skip
    stages = []
    for name, steps in (("train", 40), ("resume", 60)):
        stage = Stage(name)
        started = time.perf_counter()
        proc = run(torchrun("launch/train.py", *common, "--max_steps", str(steps)), timeout=600)
        stage.seconds = time.perf_counter() - started
        stages.append(stage)
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
    stage = Stage("eval")
    started = time.perf_counter()
    result_file = work / "eval.json"
    cmd = [sys.executable, "launch/eval.py", "--ckpt", str(run_dir), "--data", str(data), "--out", str(result_file)]
    proc = run(cmd, timeout=300)
    stage.seconds = time.perf_counter() - started
    if proc.returncode:
        stage.ok, stage.lines = False, [failure(proc)]
    else:
        result = json.loads(result_file.read_text())
        stage.ok = abs(result["loss"] - vals[60]) <= 1e-6 * abs(vals[60])
        verdict = "equals" if stage.ok else "DIFFERS FROM"
        stage.lines.append(f"step 60: val_loss {result['loss']:.6f} {verdict} the logged {vals[60]:.6f}")
    stages.append(stage)
    return stages


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes, on a CPU, to check that every stage works")
    p.add_argument("--data", help="prepared shards (default: tiny Shakespeare, prepared into --work)")
    p.add_argument("--work", help="where shards, runs and results go (default: a new temporary directory)")
    p.add_argument("--skip", default="", help="stages to leave out, comma-separated: speed, memory, train")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"speed", "memory", "train"}:
        p.error(f"--skip takes speed, memory, train; got {args.skip}")
    sizes = SMOKE if args.smoke else GPU
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else work / "data"
    started = time.perf_counter()

    stages = [Stage("data")]
    prepare(data, stages[0])
    stages += speed_and_memory(sizes, work, skip)
    if stages[0].ok and "train" not in skip:
        stages += train_resume_eval(sizes, data, work)

    import torch  # only for the header: the stages ran in their own processes

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    minutes = (time.perf_counter() - started) / 60
    print(f"gpu_check{' --smoke' if args.smoke else ''} on {device}, torch {torch.__version__}: {minutes:.1f} min; "
          f"results in {work}")  # fmt: skip
    for stage in stages:
        status = "ok" if stage.ok else "FAILED"
        for i, line in enumerate(stage.lines or [""]):
            head = f"{stage.name:<7} {status:<6} {stage.seconds:>5.0f}s" if i == 0 else ""
            print(f"{head:<21} {line}")
    return 0 if all(stage.ok for stage in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
