"""What a user reads when something fails: one `error: ...` line per failing rank, naming the
problem and the fix. The launchers turn exceptions into these lines here."""

from __future__ import annotations

import os
import sys


def first_line(error: BaseException) -> str:
    """The first line of the exception's message, or its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def print_error(message: object, info=None) -> None:
    """`error: ...` on stderr, from whichever rank failed: prefixed with the rank under torchrun.
    info: the DistInfo when the process got that far, else torchrun's environment says."""
    rank = info.rank if info is not None else int(os.environ.get("RANK", "0"))
    world_size = info.world_size if info is not None else int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"rank {rank}: " if world_size > 1 else ""
    print(f"error: {prefix}{message}", file=sys.stderr, flush=True)


def hang_sentence(within: str, detail: str = "") -> str:
    return (
        f"a collective did not complete within {within}, so a rank is hung or dead{detail}; restart the job "
        "(torchrun --max-restarts or Slurm requeue) to resume from the last checkpoint."
    )


# What gloo (and NCCL, once torchrun tears a group down) say when the rank at the other end is gone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "NCCL communicator was aborted", "ProcessGroup abort", "has been destroyed")  # fmt: skip


def _is_dist_error(error: BaseException) -> bool:
    return any(cls.__name__ == "DistError" for cls in type(error).__mro__)  # torch.distributed's, and its kinds


def failure_message(error: BaseException, group_timeout_s: float) -> str | None:
    """One line for a distributed failure this rank did not cause (a hang, a lost peer), else None.
    group_timeout_s: the process group's timeout (distributed.backend_timeout_s)."""
    text = str(error)
    timed_out = _is_dist_error(error) or "Timed out" in text or "timed out" in text
    if isinstance(error, RuntimeError) and timed_out:
        return hang_sentence(f"the process group's timeout ({group_timeout_s:g} s)", f" ({first_line(error)})")
    if isinstance(error, (RuntimeError, ConnectionError)) and any(s in text for s in _PEER_GONE):
        return (
            f"lost contact with another rank, which failed or was killed ({first_line(error)}); its own error is above."
        )
    return None


def _on_gpu(error: BaseException) -> bool:
    return type(error).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(error)


def _on_host(error: BaseException) -> bool:
    return "can't allocate memory" in str(error) or isinstance(error, MemoryError)


def out_of_memory_message(error: BaseException) -> str | None:
    """One line for a failed allocation (CUDA out of memory, or the host's), else None; it names the GPU
    memory snapshot written for it, if any (profiling.memory_snapshot_on_oom)."""
    if not (_on_gpu(error) or _on_host(error)):
        return None
    snapshot = getattr(error, "memory_snapshot", None)
    where = "GPU" if _on_gpu(error) else "host"
    seen = f"; what held the memory: {snapshot} (open it at pytorch.org/memory_viz)" if snapshot else ""
    return (
        f"out of {where} memory ({first_line(error)}){seen}; see what fits with --dry_run true (the memory planner), "
        "then lower --batch_size (accumulation keeps the global batch) or add --activation_checkpointing true."
    )
