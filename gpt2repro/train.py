"""The training loop: fit() runs a whole run, one engine.train_step() per optimizer step. No argv parsing.

fit() holds the run directory (rundir.Lock), setup() builds the Run (model, optimizer, data, resumed
state), and loop() reads top to bottom: it calls the owners that each decide their own "when": RunLog
(metrics.py) logging, Evaluator (evaluator.py) evaluation, Checkpointer (checkpoint.py) checkpoints,
Stopper here stopping, StepProfiler (profiling.py) profiling.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2repro import (
    checkpoint,
    compile_cache,
    evaluate,
    ft,
    guard,
    parallel,
    profiling,
    references,
    rundir,
    settings,
    weights,
)
from gpt2repro import config as C
from gpt2repro import distributed as D
from gpt2repro.batch import describe_batch
from gpt2repro.config import TrainConfig
from gpt2repro.data import BatchSpec, EvalWindows, ShardLoader
from gpt2repro.devices import GiB
from gpt2repro.engine import Engine, build_engine, train_step
from gpt2repro.evaluator import Evaluator
from gpt2repro.metrics import STARTUP, RunLog, timed
from gpt2repro.model import GPT
from gpt2repro.schema import to_json
from gpt2repro.settings import Machine


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed, all ranks
    skipped_steps: int = 0  # updates skipped for non-finite gradients
    spikes: int = 0  # updates the spike guard skipped (gpt2repro/guard.py)
    data_offset: int = 0  # step k trains on batch k + data_offset: a rollback moves the data past what it read
    rollbacks: int = 0


class StopSignals:
    """SIGTERM, SIGUSR1 (Slurm's warning before the time limit) and SIGINT (Ctrl-C) ask for a checkpoint
    and a clean exit after the next optimizer step (all ranks agree through D.StopVote, in the loss's
    all-reduce); a second signal exits at once, saying so.

    Under Slurm one request often arrives twice: Slurm signals every process of the job step,
    and torchrun forwards the SIGTERM it got to its workers. The same signal again within
    DUPLICATE_S of the first is that duplicate, not a second request.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    DUPLICATE_S = 10.0

    def __init__(self):
        self.received = 0
        self._received_at = 0.0
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            if signum == self.received and time.monotonic() - self._received_at < self.DUPLICATE_S:
                return
            first, second = signal.Signals(self.received).name, signal.Signals(signum).name
            os.write(
                2,
                f"{second} after {first}: exiting at once, without the checkpoint; rerun the same command "
                "to resume from the newest complete one\n".encode(),
            )
            os._exit(128 + signum)
        self.received, self._received_at = signum, time.monotonic()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def check_run_dir(run_dir: Path, cfg: TrainConfig, machine: Machine) -> None:
    """RUN_DIR may only be resumed by the same run: same model, data order and optimisation (every field
    not marked resumable, and the global batch). Its config.json is settled for this machine first: a run
    from before config.json recorded settled values compares as it would run here."""
    recorded = rundir.read_config(run_dir)
    if recorded is None:
        return
    old = settings.settle(C.from_json(recorded, str(run_dir / rundir.CONFIG)), machine)
    diffs = [
        f"{f}: {getattr(old, f)!r} -> {getattr(cfg, f)!r}"
        for f in C.FIELDS
        if f not in C.RESUMABLE and getattr(old, f) != getattr(cfg, f)
    ]
    old_world = recorded.get("world_size", 0) * max(recorded.get("ft_groups", 0), 1)
    old_global = recorded.get("batch_size", 0) * recorded.get("grad_accum_steps", 0) * old_world
    new_global = cfg.batch_size * cfg.grad_accum_steps * machine.world_size * ft.groups(cfg)
    if old_global != new_global:
        diffs.append(f"global batch {old_global} -> {new_global} sequences")
    if diffs:
        raise ValueError(
            f"{run_dir} holds a different run ({'; '.join(diffs)}); use another --out, or the same settings."
        )


@dataclass
class Run:
    """What the loop trains, built by setup(): the same on every rank (under FSDP, each rank's shards)."""

    cfg: TrainConfig  # settled: what runs, as config.json records it
    info: D.DistInfo
    run_dir: Path
    engine: Engine
    state: TrainState
    checkpointer: checkpoint.Checkpointer
    evaluator: Evaluator
    comparison: references.Comparison | None  # the reference curve each eval is judged by (--reference)
    guard: guard.SpikeGuard | None = None  # --spike_zscore
    replicas: ft.Replicas | None = None  # --ft_groups

    @property
    def raw_model(self) -> GPT:
        return self.engine.raw_model

    @property
    def tokens_per_step(self) -> int:
        return self.engine.loader.spec.global_windows * self.cfg.block_size


def fit(
    asked: TrainConfig, data_dir: str, run_dir: str | Path, info: D.DistInfo, given: frozenset[str] = frozenset()
) -> TrainState:
    """Train (or resume) a run in run_dir; every rank calls this. asked is settled for this machine
    (gpt2repro/settings.py; given: the fields typed on the command line). Returns the final state."""
    run_dir = ft.group_dir(run_dir, asked)  # under fault tolerance, the replica group's own
    lock = rundir.Lock(run_dir, holds=info.is_main)  # held by setup() once the run is known to belong there
    try:
        return loop(setup(asked, given, data_dir, Path(run_dir), info, lock))
    finally:
        lock.release()


def loop(run: Run) -> TrainState:
    """The training loop of a Run that setup() built, to max_steps or a stop; returns the final state."""
    cfg, info, state, first_step = run.cfg, run.info, run.state, run.state.step + 1
    with (
        StopSignals() as signals,
        D.Watchdog(cfg.collective_timeout_s, info) as watchdog,
        RunLog(run) as log,
        profiling.StepProfiler(cfg.profile_steps, cfg.profile_with_stack, run.run_dir, info, watchdog) as profiler,
        background_saves(run, watchdog),
        contextlib.closing(run.replicas) if run.replicas else contextlib.nullcontext(),
    ):
        stopper = Stopper(cfg, info, signals, state, run.guard)
        judge = stopper.judge if run.guard else None  # the spike guard, before each update
        stopped = 0  # the signal the run stopped on, early
        while state.step < cfg.max_steps:
            if run.replicas is not None:  # the replica groups alive for the next step; this one healed if behind
                join_replicas(run, log, stopper, watchdog)
                if state.step >= cfg.max_steps:
                    break
            step = state.step + 1
            started = time.perf_counter()
            with watchdog.slow(FIRST_STEP) if step == first_step else contextlib.nullcontext(), profiler.step(step):
                taken = train_step(run.engine, step, judge, step + state.data_offset, run.replicas)
                log.step_done(step)
            if taken is None:  # a replica group was lost during the step: nobody took it; again, without that group
                log.step_failed(step, time.perf_counter() - started)
                watchdog.beat()
                continue
            loss, grad_norm = taken
            stop = stopper.agreed()  # a stop request, read one step late while this step runs
            loss = stopper.watch(loss, grad_norm)  # the mean over ranks; counts non-finite steps
            spike, rollback_due = stopper.verdict()  # the spike guard's: one host sync per step while it is on
            if spike:  # the batch is skipped, not the step: step `step` again, on the next batch
                log.spike(state, step, step + state.data_offset, loss, grad_norm, run.guard.last_z())
                if rollback_due:  # the streak's last spike; every rank decides alike, from the same reduced numbers
                    finish_checkpoint(run, log, watchdog)  # the one in flight may be what it rolls back to
                    target = stopper.rollback_target(run.checkpointer)
                    log.flush()
                    with watchdog.slow(f"the rollback to {target}"):
                        log.rollback(*timed(info.device, roll_back, run, stopper, target, step))
                    continue
                state.data_offset += 1
                watchdog.beat()
                if stop:  # the last step's checkpoint again, with the data past this batch: a streak can be long
                    save_checkpoint(run, log, stopper, watchdog)
                    stopped = stop
                    break
                continue
            state.step, state.tokens = step, state.tokens + run.tokens_per_step
            if log.due(step):
                stopper.check(step, run.checkpointer)  # host syncs: only at log steps
                log.training(state, loss, grad_norm, stopper.take_max_z())
            if run.evaluator.due(step):
                with watchdog.slow(f"the evaluation at step {step}"):
                    log.evaluation(state, *timed(info.device, run.evaluator, step))
            log.flush()  # before the checkpoint: a checkpoint's step always has its record
            if written := run.checkpointer.poll():  # one written in the background since the last step
                log.checkpoint_written(state, written, 0.0)
            if run.checkpointer.due(step, stop):
                save_checkpoint(run, log, stopper, watchdog)
            watchdog.beat()
            if stop and step < cfg.max_steps:
                stopped = stop
                break
        finish_checkpoint(run, log, watchdog)  # the end of the run, or a stop: the last checkpoint is complete
        if stopped:
            stopper.announce(stopped, state.step, run.checkpointer.saved)
    return state


FIRST_STEP = "start-up (the first step, compilation)"


def join_replicas(run: Run, log: RunLog, stopper: Stopper, watchdog: D.Watchdog) -> None:
    """Under fault tolerance, before each step: the quorum of live replica groups (gpt2repro/ft.py), logged when
    it changes; a group behind the others heals from a live peer here, taking over its step and state."""
    previous = run.replicas.quorum
    with watchdog.slow("the quorum of replica groups (and a heal)"):
        try:
            quorum = run.replicas.join(run.state)
        except ft.ReplicaGroupError:  # no lighthouse, too few groups: the steps taken so far are kept
            newest = run.checkpointer.saved or run.checkpointer.resumed_from
            if run.state.step and (newest is None or checkpoint.step_of(newest) != run.state.step):
                save_checkpoint(run, log, stopper, watchdog)
                finish_checkpoint(run, log, watchdog)
            raise
    if quorum.healed_from_step is not None:
        stopper.restart()  # the device counters, from the healed state
    if previous is None or quorum.quorum_id != previous.quorum_id or quorum.healed_from_step is not None:
        log.quorum(run.state, ft.describe(quorum))


def save_checkpoint(run: Run, log: RunLog, stopper: Stopper, watchdog: D.Watchdog) -> None:
    """A checkpoint of the run's state as it is (its last counted step), timed and logged: the one still being
    written in the background first (one at a time), then this one's stall (asynchronous: the staging copy;
    else the whole save)."""
    finish_checkpoint(run, log, watchdog)
    with watchdog.slow(f"the checkpoint of step {run.state.step}"):
        stall = timed(run.info.device, run.checkpointer.save, run.state, stopper.bad_streak())[1]
    log.checkpoint(run.state, stall, run.checkpointer.staged_bytes if run.checkpointer.asynchronous else None)


@contextlib.contextmanager
def background_saves(run: Run, watchdog: D.Watchdog):
    """However the loop ends (an error too), the checkpoint being written in the background is finished, as a
    synchronous one would have been, before the process goes on to exit; then the staging buffers are freed."""
    try:
        yield
    finally:
        with watchdog.slow("the checkpoint being written in the background"):
            run.checkpointer.close()


def finish_checkpoint(run: Run, log: RunLog, watchdog: D.Watchdog) -> None:
    """Wait for the checkpoint being written in the background, if any, and log it with the time waited."""
    if run.checkpointer.pending is None:
        return
    with watchdog.slow(f"the checkpoint {run.checkpointer.saved} (written in the background)"):
        written, waited = timed(run.info.device, run.checkpointer.wait)
    log.checkpoint_written(run.state, written, waited)


def setup(
    asked: TrainConfig, given: frozenset[str], data_dir: str, run_dir: Path, info: D.DistInfo, lock: rundir.Lock
) -> Run:
    """Everything the loop needs: the settled config, data, the model built and wrapped for the strategy,
    the optimizer, and the state of the run's newest checkpoint (or init_from's weights, or a fresh start).
    Nothing is written before the config is known good and run_dir free for it (the lock held)."""
    machine = Machine.this(info.device, info.world_size, info.local_world_size)
    cfg = settings.settle(asked, machine, given)
    check_out_dir(run_dir)
    check_run_dir(run_dir, cfg, machine)
    if cfg.strategy in ("fsdp", "hsdp") and not info.is_distributed:
        raise ValueError(
            f"--strategy {cfg.strategy} shards the model across ranks: launch 2 or more with torchrun, or use "
            "--strategy ddp."
        )
    error = D.broadcast_object(lock.acquire(), info)  # rank 0's answer, on every rank
    if error:
        raise ValueError(error)
    layout = parallel.layout(cfg.strategy, info)  # this rank's place among the data-parallel replicas
    # Under fault tolerance the batch is every replica group's (gpt2repro/ft.py): this group's ranks come after
    # the groups before it.
    groups = ft.groups(cfg)
    spec = BatchSpec(
        cfg.batch_size, cfg.grad_accum_steps, layout.dp_size * groups, cfg.ft_group * layout.dp_size + layout.dp_rank
    )
    loader = ShardLoader(data_dir, cfg.block_size, cfg.vocab_size, spec, cfg.seed, info.device)
    val_windows = EvalWindows(data_dir, "val", cfg.block_size, cfg.eval_tokens, cfg.vocab_size)
    hellaswag_examples = evaluate.read_hellaswag(cfg.hellaswag_file) if cfg.hellaswag_file else None
    comparison = None
    if cfg.reference:
        comparison = references.Comparison(references.get(cfg.reference), references.dataset_of(data_dir))
    STARTUP.mark("data")

    cache_line = compile_cache.use(run_dir, cfg, info)  # before anything compiles
    # The same initial weights on every rank; under FSDP sharded before the optimizer sees them.
    engine = build_engine(cfg, layout, loader, cfg.seed)
    STARTUP.mark("model")
    state = TrainState()
    spike_guard = None
    if cfg.spike_zscore:
        spike_guard = guard.SpikeGuard(
            cfg.spike_zscore, cfg.spike_window, info.device, cfg.warmup_steps, cfg.rollback_after, cfg.spike_grad_zscore
        )
    checkpointer = checkpoint.Checkpointer(
        run_dir, cfg, engine.raw_model, engine.optimizer, engine.scaler, info, spike_guard
    )
    resumed_from = checkpointer.resume(state)
    if resumed_from is None:
        torch.manual_seed(cfg.seed + info.rank)  # dropout differs per rank
        if cfg.init_from:  # read by rank 0, broadcast: FSDP ranks keep their shards
            weights.load_into(engine.raw_model, cfg.init_from, info)
    replicas = None
    if cfg.ft_groups:
        replicas = ft.Replicas(
            cfg, layout, lambda: checkpointer.live_state(state), lambda peer: checkpointer.load_live_state(peer, state)
        )
        replicas.start(state.step)
    STARTUP.mark("resume")
    evaluator = Evaluator(
        cfg, val_windows, hellaswag_examples, parallel.for_eval(engine.model), engine.raw_model, layout, engine.autocast
    )
    if info.is_main:
        if warning := D.check_restart_store():
            print(warning, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_config(run_dir, run_record(asked, cfg, info.world_size, data_dir))
        print(describe_batch(asked, cfg, info.world_size * ft.groups(cfg), given), flush=True)
        plan = parallel.plan_on(cfg, machine)
        print(
            f"model {plan.num_params:,} params | {cfg.strategy} on {info.world_size} rank(s) on {info.device}"
            f"{ft.describe_launch(cfg)} | "
            f"{cfg.dtype}{' + fp8 matmuls' if cfg.fp8 else ''} | compile {'on' if cfg.compile == 'true' else 'off'} | "
            f"fused loss {'on' if cfg.fused_loss == 'true' else 'off'} | "
            f"{'resumed from ' + str(resumed_from) if resumed_from else 'from scratch'}"
        )
        for line in (cache_line, checkpointer.why_sync):
            if line:
                print(line, flush=True)
        if comparison is not None:
            print(comparison.describe(), flush=True)
        if state.step >= cfg.max_steps:
            print(f"nothing to train: the run is at step {state.step:,} of max_steps {cfg.max_steps:,}", flush=True)
        gpu_bytes = machine.gpu_memory_bytes
        if gpu_bytes and not plan.fits(gpu_bytes):
            print(
                f"warning: the memory planner estimates {plan.total / GiB:.1f} GiB per GPU, more than fits in "
                f"{gpu_bytes / GiB:.1f} GiB; see --dry_run true for the breakdown",
                flush=True,
            )
    return Run(cfg, info, run_dir, engine, state, checkpointer, evaluator, comparison, spike_guard, replicas)


def run_record(asked: TrainConfig, cfg: TrainConfig, world_size: int, data_dir: str) -> dict:
    """A run's config.json: the settled fields (typed; it works as --config), the launch and the data, and
    under "requested" what was asked where settling changed it."""
    return {
        **to_json(cfg),
        "world_size": world_size,
        "data": data_dir,
        "dataset": references.dataset_of(data_dir),
        "requested": settings.requested(asked, cfg),
    }


class Stopper:
    """When the run stops early: at a signal (StopSignals), after the next step and its checkpoint,
    on every rank at the same step (D.StopVote); with a TrainingError after max_nonfinite_steps
    consecutive non-finite losses. Also counts the updates skipped for non-finite gradients, and
    those the spike guard (gpt2repro/guard.py) skipped."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: D.DistInfo,
        signals: StopSignals,
        state: TrainState,
        spike_guard: guard.SpikeGuard | None = None,
    ):
        self.cfg, self.info, self.signals, self.state, self.guard = cfg, info, signals, state, spike_guard
        self.vote = D.StopVote(info, StopSignals.SIGNALS)
        self.is_main = info.is_main
        self.restart()

    def restart(self) -> None:
        """The device counters, from the state: at the start, and after a rollback."""
        device = self.info.device
        self.consecutive_bad = torch.zeros((), dtype=torch.long, device=device)
        self.skipped = torch.full((), self.state.skipped_steps, dtype=torch.long, device=device)
        self.spikes = torch.full((), self.state.spikes, dtype=torch.long, device=device)

    def agreed(self) -> int:
        """The signal every rank stops on (0: none), from the step before."""
        return self.vote.agreed()

    def watch(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """The loss averaged over ranks (queued on the device, no host sync), so that every rank takes the
        same non-finite decisions; this rank's stop request rides in the same all-reduce."""
        loss = self.vote.average_loss_and_count_requests(loss, self.signals.received)
        self.consecutive_bad = torch.where(torch.isfinite(loss), 0, self.consecutive_bad + 1)
        overflow = ~torch.isfinite(grad_norm)
        self.skipped += (overflow & ~self.guard.spike if self.guard is not None else overflow).long()  # a spike's own
        return loss

    def judge(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Before step `step`'s update (train_step's judge): whether the spike guard skips it, from the loss
        averaged over ranks (its own all-reduce, queued on the device: the same decision on every rank)."""
        mean = D.all_reduce_sum(loss.detach().clone(), self.info) / self.info.world_size
        spike = self.guard.check(step, mean, grad_norm)
        self.spikes += spike.long()
        return spike

    def bad_streak(self) -> int:
        return int(self.consecutive_bad)

    def take_max_z(self) -> dict | None:
        return self.guard.take_max_z() if self.guard is not None else None

    def check(self, step: int, checkpointer: checkpoint.Checkpointer) -> None:
        """At a log step: the counts into the state, and the end of a run that diverged."""
        self.count_skips()
        bad = self.bad_streak()
        if bad >= self.cfg.max_nonfinite_steps:
            good = checkpointer.last_good(step, bad)
            where = f"the last good checkpoint is {good}" if good else "no good checkpoint was written"
            raise TrainingError(
                f"{bad} consecutive steps had a non-finite loss (step {step}); "
                f"{where}. Lower --lr or check the data, then resume from it (--resume PATH)."
            )

    def count_skips(self) -> None:
        self.state.skipped_steps, self.state.spikes = int(self.skipped), int(self.spikes)

    def verdict(self) -> tuple[bool, bool]:
        """After each step: (whether the spike guard skipped it, whether a rollback is due); a host sync."""
        return self.guard.verdict() if self.guard is not None else (False, False)

    def rollback_target(self, checkpointer: checkpoint.Checkpointer) -> Path:
        """When rollback_after spikes in a row are due: the checkpoint to roll back to, the newest from at least
        rollback_after steps before the streak (the updates just before it may be what made clean batches look
        like spikes: PaLM went back about 100 steps), else the newest from before it; a TrainingError past
        max_rollbacks, or with none."""
        self.count_skips()
        began, last_batch = int(self.guard.streak_start), self.state.step + 1 + self.state.data_offset
        what = (
            f"{self.cfg.rollback_after} consecutive updates skipped as spikes at step {began} (batches "
            f"{last_batch - self.cfg.rollback_after + 1}-{last_batch} of the data's order)"
        )
        if self.state.rollbacks >= self.cfg.max_rollbacks:
            raise TrainingError(
                f"{what}, after {self.state.rollbacks} rollback(s): look at those batches, or lower --lr; to go on "
                f"past them, rerun with --max_rollbacks {self.cfg.max_rollbacks + 1} or more (it resumes)."
            )
        target = checkpointer.before(began - self.cfg.rollback_after) or checkpointer.before(began)
        if target is None:
            raise TrainingError(f"{what}, and no checkpoint from before them to roll back to.")
        return target

    def announce(self, stop: int, step: int, saved: Path | None) -> None:
        if self.is_main:
            print(
                f"stopping on {signal.Signals(stop).name} at step {step}: checkpoint {saved} "
                "is written; rerun the same command to resume",
                flush=True,
            )


def roll_back(run: Run, stopper: Stopper, target: Path, step: int) -> dict:
    """Every rank: checkpoint `target`'s weights, optimizer, guard window and RNG again, with the data moved
    past everything read since (its next step reads the batch after step `step`'s); the checkpoints after it
    set aside, and `target` written again with the new offset, so that a resume replays this order. Returns
    the event's record."""
    state = run.state
    spikes, rollbacks, read = state.spikes, state.rollbacks + 1, step + state.data_offset  # the last batch read
    run.checkpointer.load(target, state)
    run.guard.after_rollback(state.step)  # its window as of the checkpoint, judging from there on
    state.data_offset = read - state.step
    state.spikes, state.rollbacks = spikes, rollbacks
    run.checkpointer.set_aside_after(state.step)
    run.checkpointer.save(state)
    run.checkpointer.wait()  # complete before the rollback is logged: a resume after a kill replays the new order
    stopper.restart()
    if run.replicas is not None:  # the groups that rolled back further heal from the others at the next quorum
        run.replicas.start(state.step)
    return {
        "step": state.step,
        "tokens": state.tokens,
        "rollback_from": step,
        "data_offset": state.data_offset,
        "rollbacks": rollbacks,
        "spikes": spikes,
    }


def check_out_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file; pass a directory (a new one, or a run to resume).")
    if any(parent.exists() and not parent.is_dir() for parent in run_dir.parents):
        raise ValueError(f"--out {run_dir} lies under a file, not a directory; pass another path.")
