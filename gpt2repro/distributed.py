"""The only place that reads torchrun's environment or touches the process group.

`init()` works for a plain `python` process (world of one, no process group) and under
torchrun, single- or multi-node (NCCL on GPUs, gloo on CPU). `DistInfo` carries the
distributed state explicitly; rank-0-only effects sit behind `info.is_main`.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

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


def init(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Set up this process: pick its device and, under torchrun, join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if chosen.startswith("cuda"):
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.startswith("cuda") else "gloo"
        # A hung NCCL collective then raises after `timeout` and the process exits, so that
        # torchrun or Slurm can restart the job instead of it burning the allocation.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=torch.device(chosen) if backend == "nccl" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=chosen)


def check_restart_store() -> str | None:
    """A warning when torchrun may restart workers while sharing its rendezvous store with them.

    Restarted workers can then read the previous round's addresses from that store and
    fail to connect (pytorch/pytorch#135712); TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, set
    where torchrun runs, gives every round a fresh store. Seen here with gloo on 2026's torch.
    """
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if restarts > 0 and shared:
        return (
            "warning: torchrun may restart workers (--max-restarts) while sharing its rendezvous store, "
            "which can make the restart fail to connect; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "before torchrun (pytorch/pytorch#135712)."
        )
    return None


def teardown(wait_for_all: bool = False) -> None:
    """Leave the process group. wait_for_all: a barrier first, so that no rank (and no torchrun
    agent hosting the rendezvous store) goes away while another still talks to it."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait_for_all:
                dist.barrier()
        finally:
            dist.destroy_process_group()


@contextmanager
def distributed_context(device: str = "auto", timeout_s: float = 600.0):
    """init() on entry, teardown() on every exit path."""
    ok = False
    try:
        yield init(device, timeout_s)
        ok = True
    finally:
        teardown(wait_for_all=ok)  # after an error, do not wait on ranks that may be gone


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= info.world_size
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's obj, in rank order, on every rank."""
    if not info.is_distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's obj on every rank."""
    if not info.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


def hang_message(error: BaseException, timeout_s: float) -> str | None:
    """One clear sentence when `error` is a collective that timed out (a rank hung or died), else None."""
    text = str(error)
    timed_out = isinstance(error, dist.DistError) or "Timed out" in text or "timed out" in text
    if not isinstance(error, RuntimeError) or not timed_out:
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (
        f"a collective did not complete within collective_timeout_s={timeout_s:g} s, so a rank is hung or dead "
        f"({first}); restart the job (torchrun --max-restarts or Slurm requeue) to resume from the last checkpoint."
    )
