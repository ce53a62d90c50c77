"""Where training numbers go: metrics.jsonl (the contract), the console, W&B; MFU and throughput."""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2repro import references, rundir
from gpt2repro.devices import peak_tflops_of
from gpt2repro.forecast import Forecast, duration
from gpt2repro.schedule import lr_at, periodic
from gpt2repro.schema import Settings, setting
from gpt2repro.shards import write_json_atomic


@dataclass(frozen=True)
class LoggingSettings(Settings):
    TITLE = "logging and profiling"

    log_interval: int = setting(
        10, "a record and a console line every this many steps, and at the last", resumable=True, at_least=1
    )
    wandb: str = setting(
        "disabled", "Weights & Biases logging", resumable=True, choices=("online", "offline", "disabled")
    )
    wandb_project: str = setting("gpt2repro", "W&B project", resumable=True)
    wandb_run_name: str = setting("", "W&B run name (empty: the run directory's name)", resumable=True)
    peak_tflops: float = setting(
        0.0, "the accelerator's dense peak TFLOP/s for MFU (0: look the GPU up)", auto=True, resumable=True, at_least=0
    )

    def settled(self, machine) -> dict:
        return {"peak_tflops": self.peak_tflops or peak_tflops_of(machine.gpu_name, self.dtype)}


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    return None if peak is None else flops_per_token * tokens_per_s_per_device / peak


class WandbSink:
    """W&B logging on the main rank; a resumed run continues the same W&B run id."""

    def __init__(self, mode: str, run_dir: Path, project: str, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ValueError(
                f"--wandb {mode} needs the wandb package: pip install wandb, or use --wandb disabled."
            ) from None

        id_file = run_dir / rundir.WANDB_ID
        run_id = json.loads(id_file.read_text())["id"] if id_file.exists() else secrets.token_hex(4)
        write_json_atomic(id_file, {"id": run_id})
        self.run = wandb.init(
            project=project,
            name=name or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=config,
        )

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def format_line(
    record: dict, max_steps: int, eta_s: float | None, reference: str | None = None, target: str | None = None
) -> str:
    """One console line: the training numbers of a log step, then eval and checkpoint costs if any; with
    a reference, the eval's verdict against it."""
    parts = [f"step {record['step']:>6}/{max_steps}"]
    if "loss" in record:
        parts.append("loss " + ("nan" if record["loss"] is None else f"{record['loss']:.4f}"))
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    if "hellaswag_acc_norm" in record:
        parts.append(f"hellaswag {record['hellaswag_acc_norm']:.4f}")
    parts += [f"{key} {value:.4f}" for key, value in record.items() if "/" in key]  # lm-eval's TASK/METRIC
    if "verdict" in record:
        gap = "" if record["ref_val_loss"] is None else f" {record['ref_val_loss']:.4f} ({record['ref_gap']:+.4f})"
        parts.append(f"vs {reference}{gap}: {record['verdict']}")
    if record.get("target_eta_s") is not None:
        eta = record["target_eta_s"]
        parts.append(f"{target}'s loss: reached" if eta == 0 else f"{target}'s loss in ~{duration(eta)}")
    elif record.get("target_eta_why"):
        parts.append(f"no time to {target}'s loss: {record['target_eta_why']}")
    if "loss" in record:
        parts += [f"lr {record['lr']:.2e}", f"grad {record['grad_norm']:.3f}"]
        if record.get("tokens_per_s") is not None:  # none at a run's first step (compilation)
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if "spike_loss" in record:
        parts.append(
            f"SPIKE: loss {record['spike_loss']:.4f} (z {record['spike_z']:.1f}), grad "
            f"{record['spike_grad_norm']:.3f}: update skipped, batch {record['batch']} left out"
        )
    if "rollback_from" in record:
        parts.append(
            f"ROLLED BACK from step {record['rollback_from']} after {record['spikes']} spikes (rollback "
            f"{record['rollbacks']}): the data moves {record['data_offset']} batches ahead"
        )
    elif record.get("spikes"):
        parts.append(f"spikes skipped {record['spikes']}")
    parts += [f"{key} {record[f'{key}_s']:.1f}s" for key in ("eval", "ckpt", "rollback") if f"{key}_s" in record]
    if "ckpt_staged_bytes" in record:
        parts[-1] += f" stall (staged {record['ckpt_staged_bytes'] / 2**20:,.0f} MiB; written in the background)"
    if "ckpt_write_s" in record:
        waited = f", {record['ckpt_wait_s']:.1f}s waited for" if record["ckpt_wait_s"] >= 0.05 else ""
        parts.append(f"ckpt of step {record['ckpt_step']} written in {record['ckpt_write_s']:.1f}s{waited}")
    if "ft_groups_live" in record:
        healed = record.get("ft_healed_from_step")
        parts.append(
            f"replica groups alive: {record['ft_groups_live']} (quorum {record['ft_quorum_s']:.1f}s)"
            + (f"; this group healed from a live peer, from step {healed}" if healed is not None else "")
        )
    if "ft_step_failed_s" in record:
        parts.append(
            f"not taken ({record['ft_step_failed_s']:.1f}s): a replica group was lost during the step; taking it again"
        )
    if "startup_s" in record:
        split = ", ".join(
            f"{p.replace('_', ' ')} {record[f'startup_{p}_s']:.1f}" for p in STARTUP_PARTS if f"startup_{p}_s" in record
        )
        parts.append(f"start-up {record['startup_s']:.1f}s ({split})")
    if eta_s is not None and math.isfinite(eta_s):
        h, rem = divmod(int(eta_s), 3600)
        parts.append(f"eta {h}:{rem // 60:02d}:{rem % 60:02d}")
    return " | ".join(parts)


class RunLog:
    """The loop's numbers, and when they go out: a training record every log_interval steps and at
    the last step, the evaluation's results at their step (in the same record when both fall on
    it), each checkpoint's time in a record of its own. The main rank writes them to
    metrics.jsonl, W&B and the console; every rank keeps the throughput (Throughput)."""

    def __init__(self, run):
        self.cfg, self.info, self.comparison = run.cfg, run.info, run.comparison
        self.first_step, self.tokens_per_step = run.state.step + 1, run.tokens_per_step
        self.model = references.model_name(run.cfg.n_layer, run.cfg.n_head, run.cfg.n_embd)
        self.startup_s: float | None = None  # this process's start to the end of its first step
        self.devices = run.info.world_size * max(run.cfg.ft_groups, 1)  # the tokens/s is every replica group's
        self.flops_per_token = run.raw_model.flops_per_token(run.cfg.block_size)
        self.peak = run.cfg.peak_tflops * 1e12 or None  # settled: stated, else the GPU's from the table
        self.throughput = Throughput(run.state.step)
        self.forecast_due = True  # printed once, at the first log step with a measured pace
        self.evals: list[tuple[float, float]] = []  # (tokens, val loss): the projection to the target
        self.target = None
        if run.comparison is not None:
            dataset = run.comparison.run_dataset or run.comparison.reference.dataset
            self.target = references.default_target(dataset)
        self.record: dict = {}
        self.file = self.sink = None
        if run.info.is_main:
            self.started = rundir.started_at(run.run_dir)
            state = run.state
            self.file = rundir.MetricsLog(
                run.run_dir / rundir.METRICS, state.step, next_batch=state.step + 1 + state.data_offset
            )
            if run.cfg.wandb != "disabled":
                self.sink = WandbSink(
                    run.cfg.wandb, run.run_dir, run.cfg.wandb_project, run.cfg.wandb_run_name, run.cfg.to_dict()
                )

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        for out in (self.file, self.sink):
            if out is not None:
                out.close()

    def step_done(self, step: int) -> None:
        """After each training step: this process's first one (compilation, warm-up) stays out of
        tokens/s, MFU and the ETA."""
        if self.startup_s is None:  # once, whatever its number (a replica group's heal moves it)
            synchronize(self.info.device)
            self.throughput.restart(step)
            STARTUP.mark("first_step")
            parts = STARTUP.take()
            self.startup_s = sum(parts.values())
            if self.info.is_main:
                record = {"step": step, "startup_s": self.startup_s}
                self._emit(record | {f"startup_{part}_s": seconds for part, seconds in parts.items()})

    def due(self, step: int) -> bool:
        return periodic(step, self.cfg.log_interval, self.cfg.max_steps)

    def training(self, state, loss: torch.Tensor, grad_norm: torch.Tensor, max_z: dict | None = None) -> None:
        """The training numbers of a log step (host syncs: only here); with the spike guard on, its count of
        skipped updates and the largest z-scores it saw since the last log step (max_z, max_grad_z)."""
        train_s, steps = self.throughput.close(state.step)
        tok_s = self.tokens_per_step * steps / train_s if steps else None  # none yet: the first step
        self.record = {
            "step": state.step,
            "tokens": state.tokens,
            "loss": loss.item(),
            "lr": lr_at(state.step, self.cfg),
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tok_s,
            "mfu": mfu(self.flops_per_token, tok_s / self.devices, self.peak) if tok_s else None,
            "elapsed_s": None,
            "skipped_steps": state.skipped_steps,
            "eta_s": self.throughput.eta_s(self.cfg.max_steps - state.step),
        }
        if max_z is not None:
            self.record.update(spikes=state.spikes, **max_z)
        if tok_s and self.forecast_due and self.info.is_main:
            self.forecast_due = False
            print(self.forecast(state).describe(), flush=True)

    def forecast(self, state):
        """The Forecast of this process at its pace so far: its start-up (its own start to the end of its first
        step: never, after a resume, the time since the run's first launch) and its steps at the mean step time;
        evaluations and checkpoints join the ETA as they are measured."""
        step_s = self.throughput.train_s / self.throughput.steps
        curve = self.comparison.reference if self.comparison else None
        return Forecast(
            self.cfg,
            self.info.world_size,
            step_s,
            self.startup_s or 0.0,
            0.0,
            0.0,
            curve,
            self.target,
            measured=f"the pace of steps {self.first_step + 1}-{state.step}; evals and checkpoints join the ETA as "
            "they are measured",
            first_step=self.first_step,
            run_dataset=self.comparison.run_dataset if self.comparison else None,
        )

    def evaluation(self, state, results: dict, seconds: float) -> None:
        """The evaluation's results, judged against the run's reference curve (--reference) if it has one."""
        self.record.update(step=state.step, tokens=state.tokens, **results)
        if self.comparison is not None:
            self.record.update(self.comparison.fields(state.tokens, results["val_loss"]))
            if self.target is not None:
                self.record.update(self.time_to_target(state.tokens, results["val_loss"]))
        self.record["eval_s"] = seconds
        self.throughput.pause(seconds)

    def time_to_target(self, tokens: int, val_loss: float) -> dict:
        """target_eta_s: when the run reaches its target's loss (references.projection over its evals) at its
        mean tokens/s so far; 0 once reached. None where there is no projection, with target_eta_why saying why:
        the reference's curve does not apply to this run (references.why_no_projection: another dataset, another
        model size, tokens outside the curve), or the projection found none."""
        self.evals.append((tokens, val_loss))
        curve = self.comparison.reference
        projected = references.projection(self.evals, curve, self.target)
        if projected.reached:
            return {"target_eta_s": 0.0}
        why = references.why_no_projection(curve, self.comparison.run_dataset, self.model, tokens)
        if not why and projected.tokens is None:
            why = projected.sentence
        if not why and not self.throughput.steps:
            why = "no step timed yet"
        if why:
            return {"target_eta_s": None, "target_eta_why": why}
        tok_s = self.tokens_per_step * self.throughput.steps / self.throughput.train_s
        return {"target_eta_s": max(0.0, projected.tokens - tokens) / tok_s}

    def flush(self) -> None:
        """Writes the step's record, if it has one."""
        if self.record and self.info.is_main:
            self._emit(self.record)
        self.record = {}

    def spike(self, state, step: int, batch: int, loss: torch.Tensor, grad_norm: torch.Tensor, z: float) -> None:
        """A step the spike guard skipped, as evidence: its loss and z-score, and the batch left out."""
        if self.info.is_main:
            self._emit(
                {
                    "step": step,
                    "tokens": state.tokens,
                    "batch": batch,
                    "spike_loss": loss.item(),
                    "spike_grad_norm": grad_norm.item(),
                    "spike_z": z,
                }
            )

    def rollback(self, record: dict, seconds: float) -> None:
        """A rollback: the records past the step it went back to are moved aside (MetricsLog), then the event's
        own record and line."""
        self.record = {}
        self.throughput.restart(record["step"])
        if self.info.is_main:
            self.file.close()
            self.file = rundir.MetricsLog(self.file.path, record["step"], rollback=record["rollbacks"])
            self._emit({**record, "rollback_s": seconds})

    def quorum(self, state, record: dict) -> None:
        """Under fault tolerance (gpt2repro/ft.py): a new quorum of replica groups, and a heal, at the step before
        the next one."""
        if record.get("ft_healed_from_step") is not None:
            self.throughput.restart(state.step)
        if self.info.is_main:
            self._emit({"step": state.step, "tokens": state.tokens, **record})

    def step_failed(self, step: int, seconds: float) -> None:
        """A step no replica group took: a group was lost during it; it is taken again."""
        if self.info.is_main:
            self._emit({"step": step, "ft_step_failed_s": seconds})

    def checkpoint(self, state, seconds: float, staged_bytes: int | None = None) -> None:
        """A checkpoint's stall: the whole save, or (staged_bytes: written in the background) its staging copy."""
        self.throughput.pause(seconds)
        if self.info.is_main:
            record = {"step": state.step, "tokens": state.tokens, "ckpt_s": seconds}
            if staged_bytes is not None:
                record["ckpt_staged_bytes"] = staged_bytes
            self._emit(record)

    def checkpoint_written(self, state, written, waited_s: float) -> None:
        """A checkpoint written in the background (checkpoint.Written) is committed, noticed at `state`'s step:
        its write time, and the time training waited for it (at the next checkpoint, a stop, the end)."""
        self.throughput.pause(waited_s)
        if self.info.is_main:
            self._emit(
                {
                    "step": state.step,
                    "tokens": state.tokens,
                    "ckpt_step": written.step,
                    "ckpt_write_s": written.write_s,
                    "ckpt_wait_s": waited_s,
                }
            )

    def _emit(self, record: dict) -> None:
        record["elapsed_s"] = time.time() - self.started
        eta = record.pop("eta_s", None)
        self.file.write(record)
        if self.sink is not None:
            self.sink.log(record)
        reference = self.comparison.short if self.comparison else None
        target = self.target.name if self.target else None
        print(format_line(record, self.cfg.max_steps, eta, reference, target), flush=True)


STARTUP_PARTS = ("imports", "rendezvous", "data", "model", "resume", "first_step")


class Startup:
    """This process's start-up, from its start (process_age_s) to the end of its first step, in parts: each
    mark(part) closes the stretch since the mark before (the first: since the process started), in the order
    of STARTUP_PARTS: imports (Python and the package), rendezvous (the process group), data (shards and val
    windows opened), model (built, wrapped, the optimizer), resume (the checkpoint's state or init_from's
    weights loaded), first_step (compilation and warm-up). `take()` hands the parts over and starts again."""

    def __init__(self):
        self.parts: dict[str, float] = {}
        self._last: float | None = None

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        if self._last is None:
            age = process_age_s()
            self._last = now - (age if age is not None else 0.0)
        self.parts[part] = self.parts.get(part, 0.0) + now - self._last
        self._last = now

    def take(self) -> dict[str, float]:
        parts, self.parts = self.parts, {}
        return parts


STARTUP = Startup()  # one per process: the launcher marks its part, train.setup and RunLog the rest


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: its start time in /proc against the boot clock); None
    where that is unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class Throughput:
    """Training time per step, for tokens/s, MFU and the ETA.

    Each log line's window counts training steps only: eval and checkpoint time is paused out,
    and so is this process's first step (compilation, warm-up). The ETA adds eval and checkpoint
    time back at the share of the run's time they took so far.
    """

    def __init__(self, step: int):
        self.start_s, self.start_step, self.paused_s = time.perf_counter(), step, 0.0
        self.train_s = self.other_s = 0.0  # since the first step, for the ETA
        self.steps = 0

    def restart(self, step: int) -> None:
        """The window starts again now, at `step` (what came before is left out)."""
        self.start_s, self.start_step, self.paused_s = time.perf_counter(), step, 0.0

    def pause(self, seconds: float) -> None:
        self.paused_s += seconds
        self.other_s += seconds

    def close(self, step: int) -> tuple[float, int]:
        """(training seconds, steps) of the window ending now; the next one starts."""
        now = time.perf_counter()
        train_s, steps = now - self.start_s - self.paused_s, step - self.start_step
        self.start_s, self.start_step, self.paused_s = now, step, 0.0
        self.train_s += train_s
        self.steps += steps
        return train_s, steps

    def eta_s(self, remaining_steps: int) -> float | None:
        if not self.steps:
            return None
        return remaining_steps * (self.train_s + self.other_s) / self.steps


def timed(device: str, fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds), with the device's queued work finished before and after (so neither the
    training steps before it nor fn's own kernels are misattributed)."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    synchronize(device)
    return result, time.perf_counter() - t0


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
