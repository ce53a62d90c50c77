"""Looking inside a run: torch.profiler traces of chosen steps, and what held the GPU's memory
when it ran out.

    --profile_steps 10:12    steps 10 to 12 (as logged) on every rank, into
                             RUN_DIR/profile/rank{R}/steps_10-12.pt.trace.json

A trace opens in chrome://tracing, ui.perfetto.dev, or TensorBoard's profiler plugin
(`tensorboard --logdir RUN_DIR/profile`: one run per rank). Outside the chosen steps
nothing is recorded and nothing costs.

On CUDA the allocator's history (Python stacks) is recorded from start-up to the end of
the first step, where the peak is usually set; an out-of-memory error at any time writes
RUN_DIR/profile/rank{R}/oom_memory_snapshot.pickle (pytorch.org/memory_viz opens it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from gpt2repro import rundir
from gpt2repro.schema import Settings, setting

MEMORY_HISTORY_ENTRIES = 100_000


@dataclass(frozen=True)
class ProfilingSettings(Settings):
    TITLE = "logging and profiling"

    profile_steps: str = setting(
        "",
        'trace steps FIRST:LAST on every rank (torch.profiler, into RUN/profile/), e.g. "10:12"',
        resumable=True,
        metavar="A:B",
    )
    profile_with_stack: bool = setting(False, "record Python stacks in the trace (costs more)", resumable=True)

    def problems(self) -> list[str]:
        try:
            profile_range(self.profile_steps)
        except ValueError as e:
            return [str(e)]
        return []


def profile_range(spec: str) -> tuple[int, int] | None:
    """--profile_steps "A:B" -> (A, B), the first and last step profiled (as logged); "" -> None."""
    if not spec:
        return None
    first, _, last = spec.partition(":")
    try:
        steps = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"profile_steps takes FIRST:LAST step numbers, e.g. 10:12, got {spec!r}") from None
    if not 1 <= steps[0] <= steps[1]:
        raise ValueError(f"profile_steps needs 1 <= FIRST <= LAST, got {spec!r}")
    return steps


def rank_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / rundir.PROFILE / f"rank{rank}"


@contextlib.contextmanager
def memory_snapshot_on_oom(run_dir: str | Path, info):
    """On CUDA: record every allocation with its Python stack (StepProfiler stops that after the
    first step); when the GPU runs out of memory, write the allocator's state and history to
    RUN_DIR/profile/rank{R}/oom_memory_snapshot.pickle and attach its path to the error
    (error.memory_snapshot) for the one-line message."""
    cuda = info.device_type == "cuda"
    if cuda:
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=MEMORY_HISTORY_ENTRIES)
    try:
        yield
    except torch.OutOfMemoryError as error:
        if cuda:
            error.memory_snapshot = _dump_memory_snapshot(rank_dir(Path(run_dir), info.rank))
        raise


def _dump_memory_snapshot(directory: Path) -> Path | None:
    path = directory / "oom_memory_snapshot.pickle"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
    except Exception:  # the one-line error must come out whatever happens here
        return None
    return path


class StepProfiler:
    """Profiles steps first..last (profile_steps) with torch.profiler: CPU and CUDA activities, shapes
    and memory, Python stacks only when asked. Each profiled step is a range named "step N" in
    the trace. Also ends the CUDA memory history after the first step (memory_snapshot_on_oom)."""

    def __init__(self, profile_steps: str, with_stack: bool, run_dir: Path, info, watchdog):
        self.steps = profile_range(profile_steps)
        self.with_stack, self.run_dir, self.info, self.watchdog = with_stack, Path(run_dir), info, watchdog
        self._profile: profile | None = None
        self._first_step = True
        self._recorded: list[int] = []  # the steps in the trace so far (a resumed run may start inside the range)

    @contextlib.contextmanager
    def step(self, step: int):
        """The context of one training step."""
        inside = self.steps is not None and self.steps[0] <= step <= self.steps[1]
        if inside and self._profile is None:
            self._start()
        with record_function(f"step {step}") if inside else contextlib.nullcontext():
            yield
        if inside:
            self._recorded.append(step)
        if self._first_step:
            self._first_step = False
            if self.info.device_type == "cuda":
                torch.cuda.memory._record_memory_history(enabled=None)
        if inside and step == self.steps[1]:
            self._stop()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.info.device_type == "cuda" else [])
        self._profile = profile(
            activities=activities, record_shapes=True, profile_memory=True, with_stack=self.with_stack
        )
        self._profile.__enter__()

    def _stop(self) -> None:
        first, last = self._recorded[0], self._recorded[-1]
        with self.watchdog.slow(f"writing the profile of steps {first}-{last}"):
            self._profile.__exit__(None, None, None)
            path = rank_dir(self.run_dir, self.info.rank) / f"steps_{first}-{last}.pt.trace.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._profile.export_chrome_trace(str(path))
        self._profile, self._recorded = None, []
        if self.info.is_main:
            where = self.run_dir / rundir.PROFILE
            ranks = f"rank{{0..{self.info.world_size - 1}}}" if self.info.is_distributed else "rank0"
            print(
                f"profile of steps {first}-{last}: {where}/{ranks}/{path.name} (open it in chrome://tracing or "
                f"ui.perfetto.dev, or run tensorboard --logdir {where})",
                flush=True,
            )

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._profile is None:
            return
        if exc_type is None:  # the run ended inside the range (a stop, or max_steps): what was recorded
            self._stop()
        else:
            self._profile.__exit__(None, None, None)
