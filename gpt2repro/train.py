"""The training loop: fit() runs a whole run, train_step() one optimizer step. No argv parsing.

One code path for every precision: a GradScaler always sits between backward and the
optimizer. Under float16 it scales the loss as usual; under bfloat16/float32 its scale
stays a power of two (exact), and it serves to skip any step whose gradients are not
finite without a host sync (fused AdamW reads its found-inf flag on the device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)

from gpt2repro import checkpoint, evaluate, parallel, pretrained
from gpt2repro import distributed as D
from gpt2repro.config import MODEL_FIELDS, RESUMABLE_CHANGES, TrainConfig, compile_on_for, fused_loss_on, lr_at
from gpt2repro.data import BatchSpec, EvalWindows, ShardLoader
from gpt2repro.memory import GiB
from gpt2repro.metrics import MetricsLog, WandbSink, format_line, mfu, peak_flops
from gpt2repro.model import GPT, GPTConfig, with_tied, without_tied
from gpt2repro.parallel import PTDTYPE
from gpt2repro.shards import write_json_atomic


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


def model_config(cfg: TrainConfig) -> GPTConfig:
    # 64-row padding of the vocabulary: faster lm_head matmuls, never part of the loss.
    return GPTConfig(**{f: getattr(cfg, f) for f in MODEL_FIELDS}, dropout=cfg.dropout, pad_vocab_multiple=64)


def resolve_dtype(cfg: TrainConfig, device_type: str) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def precision(cfg: TrainConfig, device_type: str) -> tuple[str, torch.autocast]:
    """The run's dtype and its autocast context; on CUDA, fp32 matmuls and convolutions also use TF32."""
    dtype = resolve_dtype(cfg, device_type)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dtype, torch.autocast(device_type, dtype=PTDTYPE[dtype], enabled=dtype != "float32")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed, all ranks
    skipped_steps: int = 0  # updates skipped for non-finite gradients
    preempted: bool = False  # stopped early on SIGTERM / SIGUSR1, after a checkpoint


class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's warning before the time limit) ask for a checkpoint and a
    clean exit after the next optimizer step (all ranks agree through D.StopVote, in the loss's
    all-reduce); a second signal exits at once.

    Under Slurm one request often arrives twice: Slurm signals every process of the job step,
    and torchrun forwards the SIGTERM it got to its workers. The same signal again within
    DUPLICATE_S of the first is that duplicate, not a second request.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    DUPLICATE_S = 10.0

    def __init__(self):
        self.received = 0
        self._received_at = 0.0
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            if signum == self.received and time.monotonic() - self._received_at < self.DUPLICATE_S:
                return
            os._exit(128 + signum)
        self.received, self._received_at = signum, time.monotonic()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def make_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    # Fused AdamW: one kernel on CUDA; on this CPU build it is also the variant that is
    # bitwise reproducible across processes (the foreach one is not), which exact resume needs.
    return torch.optim.AdamW(model.optim_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


class UnitScaler(torch.amp.GradScaler):
    """bfloat16/float32 need no loss scaling: the scale stays 1.0 (multiplying by it is exact),
    and the scaler still skips non-finite steps. A skipped step does not halve it."""

    def __init__(self, device_type: str):
        super().__init__(device_type, init_scale=1.0, growth_interval=2**30)

    def update(self, new_scale=None) -> None:
        super().update(1.0)  # on the device, no host sync


def make_scaler(dtype: str, device_type: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device_type) if dtype == "float16" else UnitScaler(device_type)


def train_step(step, model, raw_model, optimizer, scaler, loader, cfg, autocast, return_logits=False):
    """One optimizer step over grad_accum_steps micro-batches; returns (mean loss, grad norm) on device.

    return_logits=True is nanoGPT's step, whose (compiled) forward also outputs the logits: the
    benchmark's baseline. Training never asks for them.
    """
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=loader.device)
    for micro in range(cfg.grad_accum_steps):
        x, y = loader.batch(step, micro)
        # Gradients cross ranks once per optimizer step: on the last micro-batch.
        with parallel.gradient_sync(model, last_micro_batch=micro == cfg.grad_accum_steps - 1):
            with autocast:
                loss = model(x, y, return_logits=return_logits)[1] / cfg.grad_accum_steps
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = parallel.clip_grad_norm(raw_model.parameters(), max_norm)
    scaler.step(optimizer)  # skipped when gradients hold inf/nan (on any rank)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, keys.tolist(), pos, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_run_dir(run_dir: Path, cfg: TrainConfig, world_size: int) -> None:
    """RUN_DIR may only be resumed by the same run: same model, data order and optimisation."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    # A field added since the run began is absent from its config.json: the run had its default.
    old = {**TrainConfig().to_dict(), **json.loads(path.read_text())}
    new = {**cfg.to_dict(), "world_size": world_size}
    free = RESUMABLE_CHANGES | {"world_size", "batch_size", "grad_accum_steps", "total_batch_tokens", "data"}
    diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in free and old.get(k) != v]
    old_global = old.get("batch_size", 0) * old.get("grad_accum_steps", 0) * old.get("world_size", 0)
    if old_global != cfg.batch_size * cfg.grad_accum_steps * world_size:
        diffs.append(f"global batch {old_global} -> {cfg.batch_size * cfg.grad_accum_steps * world_size} sequences")
    if diffs:
        raise ValueError(
            f"{run_dir} holds a different run ({'; '.join(diffs)}); use another --out, or the same settings."
        )


def fit(cfg: TrainConfig, data_dir: str, run_dir: str | Path, info: D.DistInfo) -> TrainState:
    """Train (or resume) a run in run_dir; every rank calls this. Returns the final state."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file; pass a directory (a new one, or a run to resume).")
    if any(parent.exists() and not parent.is_dir() for parent in run_dir.parents):
        raise ValueError(f"--out {run_dir} lies under a file, not a directory; pass another path.")
    check_run_dir(run_dir, cfg, info.world_size)
    device_type = info.device_type
    dtype, autocast = precision(cfg, device_type)

    spec = BatchSpec(cfg.batch_size, cfg.grad_accum_steps, info.world_size, info.rank)
    loader = ShardLoader(data_dir, cfg.block_size, cfg.vocab_size, spec, cfg.seed, info.device)
    val_windows = EvalWindows(data_dir, "val", cfg.block_size, cfg.eval_tokens, cfg.vocab_size)
    hellaswag_examples = evaluate.read_hellaswag(cfg.hellaswag_file) if cfg.hellaswag_file else None

    gpu_bytes = parallel.gpu_memory_bytes(cfg, info.device)
    compile_on = compile_on_for(cfg, device_type)
    plan = parallel.plan(cfg, model_config(cfg), info.world_size, dtype, gpu_bytes, compile_on, device_type,
                         ranks_per_node=info.local_world_size)  # fmt: skip
    strategy = plan.strategy
    if strategy in ("fsdp", "hsdp") and not info.is_distributed:
        raise ValueError(
            f"--strategy {strategy} shards the model across ranks: launch 2 or more with torchrun, or use "
            "--strategy ddp."
        )

    # The same initial weights on every rank; under FSDP sharded before the optimizer sees them.
    raw_model = parallel.build_model(model_config(cfg), strategy, dtype, info.device, cfg.seed, fp8=cfg.fp8,
                                     ranks_per_node=info.local_world_size)  # fmt: skip
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    raw_model.fused_loss = fused_loss_on(cfg.fused_loss, device_type)
    optimizer = make_optimizer(raw_model, cfg)
    scaler = make_scaler(dtype, device_type)
    state = TrainState()
    resumed_from = load_resume_point(cfg, run_dir, raw_model, optimizer, scaler, state, info)
    if resumed_from is None:
        torch.manual_seed(cfg.seed + info.rank)  # dropout differs per rank
        if cfg.init_from:  # read by rank 0, broadcast: FSDP ranks keep their shards
            pretrained.load_into(raw_model, cfg.init_from, info)

    model = parallel.wrap(raw_model, strategy, info, compile_on)
    eval_model = parallel.for_eval(model)

    tokens_per_step = spec.global_windows * cfg.block_size
    flops_per_token = raw_model.flops_per_token(cfg.block_size)
    peak = peak_flops(info.device, cfg.peak_tflops, dtype)
    log = sink = started = None
    if info.is_main:
        if warning := D.check_restart_store():
            print(warning, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        started = _started(run_dir)
        write_json_atomic(run_dir / "config.json", {**cfg.to_dict(), "world_size": info.world_size, "data": data_dir})
        log = MetricsLog(run_dir / "metrics.jsonl", state.step)
        if cfg.wandb != "disabled":
            sink = WandbSink(cfg.wandb, run_dir, cfg.wandb_project, cfg.wandb_run_name, cfg.to_dict())
        print(
            f"model {plan.num_params:,} params | {strategy} on {info.world_size} rank(s) on {info.device} | {dtype}"
            f"{' + fp8 matmuls' if cfg.fp8 else ''} | "
            f"compile {'on' if compile_on else 'off'} | fused loss {'on' if raw_model.fused_loss else 'off'} | "
            f"{'resumed from ' + str(resumed_from) if resumed_from else 'from scratch'}"
        )
        if gpu_bytes and not plan.fits(gpu_bytes):
            print(f"warning: the memory planner estimates {plan.total / GiB:.1f} GiB per GPU, more than fits in "
                  f"{gpu_bytes / GiB:.1f} GiB; see --dry_run true for the breakdown", flush=True)  # fmt: skip

    consecutive_bad = torch.zeros((), dtype=torch.long, device=info.device)
    skipped = torch.full((), state.skipped_steps, dtype=torch.long, device=info.device)
    throughput = Throughput(state.step)
    vote = D.StopVote(info, StopSignals.SIGNALS)
    first_step = state.step + 1
    try:
        with StopSignals() as signals, D.Watchdog(cfg.collective_timeout_s, info) as watchdog:
            while state.step < cfg.max_steps:
                starting = state.step + 1 == first_step
                with watchdog.slow("start-up (the first step, compilation)") if starting else contextlib.nullcontext():
                    loss, grad_norm = train_step(state.step, model, raw_model, optimizer, scaler, loader, cfg, autocast)
                    if starting:  # compilation and warm-up stay out of tokens/s, MFU and the ETA
                        synchronize(info.device)
                        throughput.restart(first_step)
                # A signal may reach some ranks only: all of them stop at the same step, the next one.
                stop = vote.agreed()  # read one step late, while this step runs
                # Mean over ranks every step (queued on the device, no host sync), so that every
                # rank sees the same loss and takes the same non-finite decisions.
                loss = vote.mean_loss(loss, signals.received)
                consecutive_bad = torch.where(torch.isfinite(loss), 0, consecutive_bad + 1)
                skipped += (~torch.isfinite(grad_norm)).long()
                state.step += 1
                state.tokens += tokens_per_step
                done = state.step == cfg.max_steps
                record = {}
                if state.step % cfg.log_interval == 0 or done:
                    loss_mean = loss.item()  # host sync: only at log steps
                    train_s, steps = throughput.close(state.step)
                    tok_s = tokens_per_step * steps / train_s if steps else None  # none yet: the first step
                    state.skipped_steps = int(skipped)
                    record = {
                        "step": state.step, "tokens": state.tokens, "loss": loss_mean, "lr": lr_at(state.step - 1, cfg),
                        "grad_norm": grad_norm.item(), "tokens_per_s": tok_s,
                        "mfu": mfu(flops_per_token, tok_s / info.world_size, peak) if tok_s else None,
                        "elapsed_s": None, "skipped_steps": state.skipped_steps,
                        "eta_s": throughput.eta_s(cfg.max_steps - state.step),
                    }  # fmt: skip
                    if int(consecutive_bad) >= cfg.max_nonfinite_steps:
                        good = last_good(run_dir, state.step, int(consecutive_bad), resumed_from)
                        where = f"the last good checkpoint is {good}" if good else "no good checkpoint was written"
                        raise TrainingError(
                            f"{int(consecutive_bad)} consecutive steps had a non-finite loss (step {state.step}); "
                            f"{where}. Lower --lr or check the data, then resume from it (--resume PATH)."
                        )
                if state.step % cfg.eval_interval == 0 or done:
                    with watchdog.slow(f"the evaluation at step {state.step}"):
                        val_loss, eval_s = timed(info.device, evaluate.val_loss, eval_model, val_windows,
                                                 cfg.batch_size, info, autocast)  # fmt: skip
                        record.update(step=state.step, tokens=state.tokens, val_loss=val_loss)
                        if hellaswag_examples:
                            scores, hellaswag_s = timed(
                                info.device, evaluate.hellaswag, raw_model, hellaswag_examples, info
                            )
                            record["hellaswag_acc_norm"] = scores["acc_norm"]
                            eval_s += hellaswag_s
                    record["eval_s"] = eval_s
                    throughput.pause(eval_s)
                # The step's record goes out before its checkpoint: a crash between the two must not
                # leave a checkpoint whose step has no record (a resume never logs that step again).
                if record and info.is_main:
                    emit(record, log, sink, cfg, started)
                if state.step % cfg.ckpt_interval == 0 or done or stop:
                    good = last_good(run_dir, state.step, int(consecutive_bad), resumed_from)
                    with watchdog.slow(f"the checkpoint of step {state.step}"):
                        saved, ckpt_s = timed(info.device, save_checkpoint, run_dir, cfg, raw_model, optimizer,
                                              scaler, state, info, keep_also=good)  # fmt: skip
                    throughput.pause(ckpt_s)
                    if info.is_main:  # a record of its own, at the same step
                        emit({"step": state.step, "tokens": state.tokens, "ckpt_s": ckpt_s}, log, sink, cfg, started)
                watchdog.beat()
                if stop and not done:
                    if info.is_main:
                        print(f"stopping on {signal.Signals(stop).name} at step {state.step}: checkpoint {saved} "
                              "is written; rerun the same command to resume", flush=True)  # fmt: skip
                    state.preempted = True
                    break
    finally:
        if log is not None:
            log.close()
        if sink is not None:
            sink.close()
    return state


def _started(run_dir: Path) -> float:
    """Wall-clock start of the run, kept across resumes (for elapsed_s)."""
    path = run_dir / "started_at"
    if not path.exists():
        path.write_text(f"{time.time()}\n")
    return float(path.read_text())


def emit(record: dict, log: MetricsLog, sink, cfg: TrainConfig, started: float) -> None:
    record["elapsed_s"] = time.time() - started
    eta = record.pop("eta_s", None)
    log.write(record)
    if sink is not None:
        sink.log(record)
    print(format_line(record, cfg.max_steps, eta), flush=True)


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


def training_state(raw_model, optimizer) -> dict:
    """Model and AdamW state as DCP saves and loads it: whole tensors (DDP) or this rank's shards (FSDP),
    keyed by parameter name; the tied output weight once."""
    model_state, optimizer_state = get_state_dict(raw_model, optimizer)
    return {"model": without_tied(model_state), "optimizer": optimizer_state}


def last_good(run_dir: Path, step: int, consecutive_bad: int, resumed_from: Path | None = None) -> Path | None:
    """The newest checkpoint whose weights still gave a finite loss: checkpoint j holds the weights
    after update j, which the loss of step j + 1 measures; a streak of consecutive_bad non-finite
    losses ending at `step` therefore began with the weights of step - consecutive_bad."""
    candidates = checkpoint.list_steps(run_dir) + ([resumed_from] if resumed_from else [])
    good = [p for p in candidates if checkpoint.step_of(p) < step - consecutive_bad]
    return max(good, key=checkpoint.step_of) if good else None


def save_checkpoint(run_dir, cfg, raw_model, optimizer, scaler, state: TrainState, info: D.DistInfo,
                    keep_also: Path | None = None) -> Path:  # fmt: skip
    """Every rank writes its part of the model and optimizer state (sharded under FSDP) at once.
    Retention keeps keep_also too (the last good checkpoint, while the newest are suspect)."""
    rng_states = D.gather_objects(rng_state(), info)  # collective: every rank takes part
    trainer = {
        "step": state.step, "tokens": state.tokens, "skipped_steps": state.skipped_steps,
        "scaler": scaler.state_dict(), "rng": rng_states,
    }  # fmt: skip
    meta = {
        "config": cfg.to_dict(), "model": dataclasses.asdict(raw_model.config),
        "dtype": resolve_dtype(cfg, info.device_type), "world_size": info.world_size,
        "strategy": parallel.strategy_of(raw_model), "tokens": state.tokens,
    }  # fmt: skip
    try:
        path = checkpoint.save(run_dir, state.step, training_state(raw_model, optimizer), trainer, meta, info)
    except checkpoint.CheckpointError as e:
        raise TrainingError(str(e)) from None
    if info.is_main:
        checkpoint.prune(run_dir, cfg.keep_ckpts, keep_also)
    return path


def find_resume_point(cfg, run_dir: Path, info: D.DistInfo) -> Path | None:
    """The checkpoint cfg.resume names (auto: the newest intact one), chosen by rank 0 for all ranks."""
    if cfg.resume == "never":
        if checkpoint.list_steps(run_dir):
            raise ValueError(f"{run_dir} already has checkpoints but --resume never was given; use another --out.")
        return None
    found = error = None
    if info.is_main:  # hashing a big checkpoint once is enough
        try:
            found = checkpoint.latest_valid(run_dir) if cfg.resume == "auto" else checkpoint.check(Path(cfg.resume))
        except checkpoint.CheckpointError as e:
            error = str(e)
    found, error = D.broadcast_object((found, error), info)
    if error:
        raise checkpoint.CheckpointError(error)
    return found


def load_resume_point(cfg, run_dir: Path, raw_model, optimizer, scaler, state: TrainState, info) -> Path | None:
    """Restore model, optimizer, scaler, step and RNG from the checkpoint cfg.resume asks for.

    The checkpoint may come from another number of ranks or the other strategy: DCP reshards.
    """
    path = find_resume_point(cfg, run_dir, info)
    if path is None:
        return None
    saved = checkpoint.read_meta(path)["config"]
    mismatched = [f"{f}={saved[f]} (checkpoint) vs {getattr(cfg, f)} (config)"
                  for f in MODEL_FIELDS if saved.get(f) != getattr(cfg, f)]  # fmt: skip
    if mismatched:
        raise ValueError(f"Checkpoint {path} is for another model shape: {', '.join(mismatched)}.")
    loaded = training_state(raw_model, optimizer)
    checkpoint.load_state(path, loaded, info)
    set_state_dict(
        raw_model, optimizer, model_state_dict=with_tied(loaded["model"]), optim_state_dict=loaded["optimizer"]
    )
    trainer = checkpoint.read_trainer(path)
    scaler.load_state_dict(trainer["scaler"])
    state.step, state.tokens, state.skipped_steps = trainer["step"], trainer["tokens"], trainer["skipped_steps"]
    rngs = trainer["rng"]
    if len(rngs) == info.world_size:  # same world: every rank continues its own random stream
        set_rng_state(rngs[info.rank])
    else:  # another world size: fresh streams, still one per rank (dropout masks must differ)
        torch.manual_seed(cfg.seed + 1_000_003 * state.step + info.rank)
    return path
