"""A run directory (--out): the one owner of its files' names and formats, which every writer and reader goes
through (training, the log, compare, the references, the tune, the benchmarks). docs/run-directory.md lists
what each file holds.

    config.json                 the run's record: its settled config, "requested", world_size, data, dataset
    metrics.jsonl               one JSON object per line: the logged steps, evaluations, checkpoints, spikes
    metrics.rolled_back.jsonl   the records a spike guard's rollback took back, each with its number
    started_at                  the first launch's wall-clock start (elapsed_s counts from it)
    checkpoints/                step_XXXXXXXX/ (gpt2repro/checkpoint.py owns what is inside)
    compile_cache/              Inductor's cache with --compile true, and its fingerprint.json
                                (gpt2repro/compile_cache.py)
    profile/                    torch.profiler traces and memory snapshots (gpt2repro/profiling.py)
    wandb/, wandb_id.json       with --wandb online|offline
    .lock                       held by the launch that trains in it (its rank 0), released when it ends
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
from pathlib import Path

from gpt2repro.shards import atomic_file, write_json_atomic

CONFIG = "config.json"
METRICS = "metrics.jsonl"
ROLLED_BACK = "metrics.rolled_back.jsonl"
STARTED = "started_at"
CHECKPOINTS = "checkpoints"
COMPILE_CACHE = "compile_cache"
PROFILE = "profile"
WANDB_ID = "wandb_id.json"
LOCK = ".lock"


class Lock:
    """One launch at a time in a run directory: rank 0's acquire() holds RUN_DIR/.lock (an flock, which the
    kernel releases when the process ends, however it ends) until release(), or says which launch holds it.
    Two launches in one directory would delete each other's checkpoints in the making and interleave
    metrics.jsonl. Where the file system has no locks, nothing is held."""

    def __init__(self, run_dir: str | os.PathLike, holds: bool = True):
        self.path, self.holds, self.file = Path(run_dir) / LOCK, holds, None

    def acquire(self) -> str | None:
        """Hold the lock; the sentence saying why it cannot be held, else None."""
        if not self.holds:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")  # noqa: SIM115 (held until release)
        except OSError as e:
            return f"cannot write in {self.path.parent} ({e.strerror or e}); pass another --out."
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "a process"
            self.release()
            return (
                f"{self.path.parent} is in use by another launch ({holder}); stop it first (under torchrun, its "
                "workers too), or use another --out."
            )
        except OSError:  # a file system without locks: nothing to hold
            self.release()
            return None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        return None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_config(run_dir: str | os.PathLike) -> dict | None:
    """The run's config.json record; None where the directory holds none."""
    path = Path(run_dir) / CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def write_config(run_dir: str | os.PathLike, record: dict) -> None:
    write_json_atomic(Path(run_dir) / CONFIG, record)


def has_metrics(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / METRICS).is_file()


def read_metrics(run_dir: str | os.PathLike, name: str = METRICS) -> list[dict]:
    """The records of metrics.jsonl (or of ROLLED_BACK), none where it does not exist; a last line cut short
    (a run writing right now, or killed mid-line) is left out."""
    path = Path(run_dir) / name
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """RUN_DIR/metrics.jsonl: one JSON object per logged step. Written by the main rank only."""

    def __init__(self, path: str | os.PathLike, resume_step: int, rollback: int = 0, next_batch: int | None = None):
        """The log, cut back to resume_step: the records past it are about to be logged again. After a resume
        they are the same again and dropped (but the batches the spike guard skipped before next_batch, the
        first the resumed run reads: a stop in the middle of a streak); after rollback number `rollback` they
        are the evidence (the spiking losses), moved to ROLLED_BACK beside it, never deleted."""
        self.path, self.next_batch = Path(path), next_batch
        if self.path.exists():
            self._cut_after(resume_step, rollback)
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the whole run)

    def _cut_after(self, step: int, rollback: int) -> None:
        kept, past = [], []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            skipped_before = self.next_batch is not None and record.get("batch", math.inf) < self.next_batch
            if record.get("step", math.inf) <= step or skipped_before:
                kept.append(line + "\n")
            else:
                past.append(record)
        if rollback and past:  # first set aside (durably), then cut: a kill between them loses nothing
            with open(self.path.with_name(ROLLED_BACK), "a") as f:
                f.write("".join(json.dumps({**r, "rollback": rollback}) + "\n" for r in past))
                f.flush()
                os.fsync(f.fileno())
        with atomic_file(self.path, "w") as f:
            f.write("".join(kept))

    def write(self, record: dict) -> None:
        # NaN and Infinity are not JSON: strict readers reject them. A non-finite value is null.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def started_at(run_dir: Path) -> float:
    """Wall-clock start of the run, kept across resumes (for elapsed_s)."""
    path = Path(run_dir) / STARTED
    if not path.exists():
        path.write_text(f"{time.time()}\n")
    return float(path.read_text())
