"""The only place that reads torchrun's environment or touches the process group.

`init()` works for a plain `python` process (world of one, no process group) and under
torchrun, single- or multi-node (NCCL on GPUs, gloo on CPU). `DistInfo` carries the
distributed state explicitly; rank-0-only effects sit behind `info.is_main`.
"""

from __future__ import annotations

import datetime
import gc
import os
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2repro.errors import first_line, hang_sentence, print_error
from gpt2repro.schema import Settings, setting


@dataclass(frozen=True)
class ClusterSettings(Settings):
    TITLE = "cluster and faults"

    collective_timeout_s: float = setting(
        600.0,
        "a rank silent this long inside a collective fails the job "
        "(evaluations and checkpoints get SLOW_PHASE_TIMEOUT_S)",
        resumable=True,
    )

    def problems(self) -> list[str]:
        if not self.collective_timeout_s > 0:
            return [f"collective_timeout_s must be positive, got {self.collective_timeout_s}"]
        return []


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    local_world_size: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


def _pick_device(requested: str, local_rank: int) -> str:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA GPU is visible; use --device cpu.")
    return f"cuda:{local_rank}"


# The bound on the stretches of a run that do work of their own between collectives, and may
# take minutes where a training step takes a second: start-up up to the end of the first step
# (compilation), each evaluation (HellaSwag included; the first one compiles again) and each
# checkpoint (a 1558M one with AdamW state is ~19 GB for a shared file system). A training step
# is bounded by collective_timeout_s (Watchdog).
SLOW_PHASE_TIMEOUT_S = 1800.0


def slow_phase_timeout_s(timeout_s: float) -> float:
    return max(timeout_s, SLOW_PHASE_TIMEOUT_S)


def backend_timeout_s(timeout_s: float) -> float:
    """The process group's own timeout: a little past the longest bound the trainer's Watchdog sets
    (slow_phase_timeout_s), so that the Watchdog, which prints one clear line naming what hung, always
    fires first; NCCL's own watchdog, which aborts with a page of C++ log, is the last resort. A
    collective that outlives a healthy checkpoint on a slow rank therefore never times out."""
    return slow_phase_timeout_s(timeout_s) * 1.1 + 10


RESTART_FIX = (
    "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 where torchrun runs, so that every restart round gets a "
    "fresh rendezvous store (pytorch/pytorch#135712)"
)
RESTART_JOIN_TIMEOUT_S = 90.0


def init(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Set up this process: pick its device and, under torchrun, join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if chosen.startswith("cuda"):
        torch.cuda.set_device(chosen)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    info = DistInfo(
        rank=rank, local_rank=local_rank, world_size=world_size, device=chosen, local_world_size=local_world_size
    )
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.startswith("cuda") else "gloo"
        # A hung NCCL collective then tears the process down after `timeout`, so that torchrun or
        # Slurm can restart the job instead of it burning the allocation (the Watchdog below
        # normally ends it a little earlier, with a readable message).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        timeout = datetime.timedelta(seconds=backend_timeout_s(timeout_s))
        device_id = torch.device(chosen) if backend == "nccl" else None
        store, restart = _restart_round_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
        else:  # a restarted round on torchrun's shared store: joined in bounded time, or one clear error
            message = f"the restarted workers could not rejoin within {RESTART_JOIN_TIMEOUT_S:g} s; {RESTART_FIX}."
            with Watchdog(RESTART_JOIN_TIMEOUT_S, info, message) as watchdog:
                watchdog.beat()
                try:
                    dist.init_process_group(
                        backend, store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id
                    )
                    _barrier()
                except RuntimeError as e:
                    raise ValueError(
                        f"restart {restart}: the workers could not reconnect ({first_line(e)}); {RESTART_FIX}."
                    ) from None
    return info


def _restart_round_store(timeout: datetime.timedelta) -> tuple[dist.Store | None, int]:
    """(store, restart count) for a restarted round under torchrun's shared rendezvous store; (None, 0) otherwise.

    torchrun's agent keeps one TCPStore for all rounds and torch does not scope the workers'
    keys by round, so restarted workers can read the previous round's addresses (#135712).
    Scoping them by TORCHELASTIC_RESTART_COUNT fixes it wherever that count agrees across ranks
    (one node: one agent restarts all its workers); across nodes it may not, and the round
    then fails within RESTART_JOIN_TIMEOUT_S naming the fix.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart == 0:
        return None, 0
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"gpt2repro/restart_{restart}", client), restart


def check_restart_store() -> str | None:
    """A warning when torchrun on several nodes may restart workers while sharing its rendezvous
    store with them (see _restart_round_store: on one node restarts work either way)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if restarts > 0 and shared and nodes > 1:
        return f"warning: torchrun may restart workers (--max-restarts) on {nodes} nodes; {RESTART_FIX}."
    return None


def teardown(wait_for_all: bool = False) -> None:
    """Leave the process group. wait_for_all: a barrier first, so that no rank (and no torchrun
    agent hosting the rendezvous store) goes away while another still talks to it.

    What is garbage goes first: an FSDP or DDP model that is no longer referenced still lives on in
    reference cycles (module <-> hooks), and with it the process groups its state holds. Left to the
    interpreter's exit, their gloo threads (holding tensors) are destroyed while the interpreter is torn
    down, and a loaded machine aborted there ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait_for_all:
                _barrier()
        finally:
            gc.collect()
            dist.destroy_process_group()


@contextmanager
def distributed_context(device: str = "auto", timeout_s: float = 600.0):
    """init() on entry, teardown() on every exit path."""
    ok = False
    try:
        yield init(device, timeout_s)
        ok = True
    except BaseException as error:
        # Free what the failed code still holds through the traceback (a DDP model's reducer keeps the
        # process group alive) while the group is registered. Freed after teardown instead, the reducer
        # would destroy the group holding the GIL, which deadlocks against a gloo thread that needs the
        # GIL to finish a collective (pytorch/pytorch#56297): the failed rank would hang, not exit.
        traceback.clear_frames(error.__traceback__)
        gc.collect()
        raise
    finally:
        teardown(wait_for_all=ok)  # after an error, do not wait on ranks that may be gone


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_objects(obj, info: DistInfo, group=None) -> list:
    """Every rank's obj, in rank order, on every rank (group: a group of all ranks, else the default one)."""
    if not info.is_distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, info: DistInfo, group=None):
    """Rank 0's obj on every rank."""
    if not info.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier(info: DistInfo, group=None) -> None:
    if info.is_distributed:
        _barrier(group)


def _barrier(group=None) -> None:
    """dist.barrier on this rank's own GPU, named explicitly (NCCL would otherwise warn, or guess
    the GPU from the global rank)."""
    if dist.get_backend(group) == "nccl":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def side_group(info: DistInfo, timeout_s: float):
    """A gloo group of all ranks, for work beside the training (a checkpoint written in the background): its
    collectives never queue behind the training's, nor the training's behind its. None in one process. Every
    rank calls this together."""
    if not info.is_distributed:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=backend_timeout_s(timeout_s)))


class Watchdog:
    """Ends this process with one clear line when a stretch of the run outlives its bound.

    After each beat, the next training step must end (beat again) within timeout_s: a step does
    little but compute and collectives, so a long silence means a rank is hung or dead. The
    stretches that do long work of their own (`with watchdog.slow("..."):` start-up, evaluation,
    checkpoints) have the longer slow_phase_timeout_s, and the message names them. Not armed
    before the first beat or slow stretch.

    NCCL's own watchdog would abort the process with a C++ exception and a page of log
    instead; the process group's timeout is longer than every bound here (backend_timeout_s),
    so this one speaks first. A blocked collective or GPU sync releases the GIL, so this thread runs.
    """

    def __init__(self, timeout_s: float, info: DistInfo, message: str | None = None):
        self.timeout_s, self.info = timeout_s, info
        self.message = message or hang_sentence(f"collective_timeout_s={timeout_s:g} s")
        self._deadline: tuple[float, str] | None = None  # (monotonic time, the line to print then)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpt2repro-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if self.info.is_distributed:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()

    def beat(self) -> None:
        """Progress: the next step starts now, and has timeout_s."""
        self._deadline = (time.monotonic() + self.timeout_s, self.message)

    @contextmanager
    def slow(self, what: str):
        """A stretch of long work (`what`: "the checkpoint of step 2000") under the slow bound; a beat after it."""
        bound = slow_phase_timeout_s(self.timeout_s)
        self._deadline = (
            time.monotonic() + bound,
            f"{what} did not finish within {bound:g} s (the bound for start-up, evaluation and checkpoints), so a "
            "rank is hung or dead, or the file system stalled; restart the job (torchrun --max-restarts or Slurm "
            "requeue) to resume from the last checkpoint.",
        )
        try:
            yield
        finally:
            self.beat()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 10)):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline[0]:
                print_error(deadline[1], self.info)
                os._exit(1)


class StopVote:
    """Agree on a stop request (a signal that reached some ranks only) at the same step on every
    rank, on the job's own backend and without a new host sync.

    Each step's loss is averaged over ranks anyway: the requests ride in that all-reduce, as one
    count per signal beside the loss (so every rank also learns which signal came). The counts are
    copied to the host asynchronously and read one step later, once the next step is queued: the
    read waits only for work that is a step old, so the GPU queue never runs dry, and every rank
    reads the same sums after the same step.
    """

    def __init__(self, info: DistInfo, signals: tuple[int, ...]):
        self.info, self.signals = info, signals
        cuda = info.device_type == "cuda"
        counts = torch.zeros(len(signals))  # the last reduce's counts, on the host (pinned: copied asynchronously)
        self._counts = counts.pin_memory() if cuda else counts
        self._copied = torch.cuda.Event() if cuda else None
        self._pending = False

    def average_loss_and_count_requests(self, loss: torch.Tensor, request: int) -> torch.Tensor:
        """The loss averaged over all ranks (on the device); this rank's request (a signal, or 0) joins
        the same all-reduce."""
        packed = torch.zeros(1 + len(self.signals), device=loss.device)
        packed[0] = loss
        if request in self.signals:  # a fill with a host scalar: no copy, no sync
            packed[1 + self.signals.index(request)] = 1.0
        all_reduce_sum(packed, self.info)
        self._counts.copy_(packed[1:], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self._pending = True
        return packed[0] / self.info.world_size

    def agreed(self) -> int:
        """The signal all ranks stop on, from the previous step's all-reduce (0: none, or no step yet)."""
        if not self._pending:
            return 0
        if self._copied is not None:
            self._copied.synchronize()
        counts = self._counts.tolist()
        return next((s for s, n in zip(self.signals, counts, strict=True) if n > 0), 0)
