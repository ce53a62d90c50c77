"""What a user reads when something fails: one `error: ...` line per failing rank, naming the
problem and the fix. The launchers turn exceptions into these lines here."""

from __future__ import annotations

import os
import re
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
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
    "NCCL communicator was aborted",
    "ProcessGroup abort",
    "has been destroyed",
    "ncclRemoteError",
)
# A collective or the rendezvous store gave up waiting: gloo's "Timed out waiting ... for recv", NCCL's
# watchdog "ran for ... milliseconds before timing out", the store's "Socket Timeout".
_TIMED_OUT = re.compile(r"timed out|timing out|timeout", re.IGNORECASE)
# NCCL failed by itself: "NCCL error in: ..., unhandled system error ...", ncclSystemError, ncclInternalError ...
_NCCL_FAILED = re.compile(r"NCCL error|nccl\w*Error")

NCCL_FIXES = (
    "rerun with NCCL_DEBUG=INFO to see why; the usual causes: the wrong network interface (set NCCL_SOCKET_IFNAME "
    "to the one the nodes reach each other on, e.g. eth0 or ib0) or a broken or absent InfiniBand (NCCL_IB_DISABLE=1)"
    ". A restart meets the same error until the cause is fixed."
)


def failure_message(error: BaseException, group_timeout_s: float) -> str | None:
    """One line for a distributed failure this rank did not cause (a hang, a lost peer, NCCL failing), else None.
    group_timeout_s: the process group's timeout (distributed.backend_timeout_s)."""
    if not isinstance(error, (RuntimeError, ConnectionError)):
        return None
    text = str(error)
    nccl_failed = _NCCL_FAILED.search(text) is not None
    # NCCL's own error (a connect that timed out at start-up included) is its own, unless a peer died.
    if nccl_failed and "ncclRemoteError" not in text:
        return f"NCCL failed: {_nccl_words(text)}; {NCCL_FIXES}"
    if not nccl_failed and _TIMED_OUT.search(text):
        return hang_sentence(f"the process group's timeout ({group_timeout_s:g} s)", f" ({first_line(error)})")
    if any(s in text for s in _PEER_GONE):
        return (
            f"lost contact with another rank, which failed or was killed ({first_line(error)}); its own error is above."
        )
    return None


def _nccl_words(text: str) -> str:
    """NCCL's own account, on one line: its error line, the ncclXxxError line and the last error it names."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    kept = [line for line in lines if _NCCL_FAILED.search(line)]
    if "Last error:" in lines:
        kept += lines[lines.index("Last error:") + 1 :][:1]
    return " / ".join(dict.fromkeys(kept or lines[:1])).rstrip(".")


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
