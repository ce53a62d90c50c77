"""Process-level set-up that launchers do before importing torch (no torch here)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys

# The oldest torch the package runs on: torch.optim.Muon's algorithm (torch.optim._muon) came with 2.9;
# get_total_norm, torch.compiler.set_stance and FSDP2's public fully_shard with 2.6. pyproject says the same.
TORCH_FLOOR = (2, 9)

_HUGE = str(1 << 34)


def keep_freed_memory_in_heap() -> None:
    """Re-execute this process once with glibc malloc tunables that keep freed blocks.

    By default glibc serves every block over 32 MB (the (B, T, vocab) logits and their
    gradients) with a fresh mmap and returns it to the OS on free, so each training step
    page-faults hundreds of MB back in: on a 2-core CPU that was a quarter of the step
    (472 -> 640 tokens/s with the tunables, at the cost of a larger resident set). The
    tunables are read at process start only, hence the re-exec; the PID stays the same,
    so torchrun and Slurm see nothing. A no-op off Linux or when already set.
    """
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": _HUGE, "MALLOC_TRIM_THRESHOLD_": _HUGE}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def torch_too_old(version: str | None = None) -> str | None:
    """The sentence saying that the installed torch (or `version`) is older than TORCH_FLOOR, else None.
    Read from the installed package's metadata: torch itself is not imported."""
    if version is None:
        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return None  # not installed as a package (a source build): nothing to read, torch's own import decides
    release = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if release >= TORCH_FLOOR:
        return None
    floor = ".".join(map(str, TORCH_FLOOR))
    return (
        f"gpt2repro needs torch {floor} or newer, and this is torch {version}; install a newer build: "
        f"pip install 'torch>={floor}' (on a GPU machine, the build for your CUDA version from pytorch.org)."
    )


def require_torch() -> None:
    """Exit with one `error:` line when the installed torch is too old (launchers call it before importing torch)."""
    problem = torch_too_old()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)


def underscored(argv: list[str]) -> list[str]:
    """argv with each flag's name spelled with underscores, the one spelling of every entry point's flags
    (--batch_size -> --batch_size, as config files spell fields); values are left as they are."""
    spelled = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        spelled.append(arg)
    return spelled
