"""Checkpoints: when to save and what (Checkpointer), sharded atomic save, integrity-checked load,
resume, newest-valid lookup, retention.

A checkpoint is a directory RUN_DIR/checkpoints/step_XXXXXXXX:

    state/       model and AdamW state, written by every rank in parallel with
                 torch.distributed.checkpoint (DCP); it loads into any number of ranks
                 and either strategy (DDP or FSDP), resharding as needed
    trainer.pt   step, tokens, GradScaler state and every rank's RNG state (rank 0)
    meta.json    the run's settled config, the model's, world size, and each file's size and sha256

It is written under a temporary name and renamed into place only when complete, so a kill
mid-write never leaves a directory that looks valid; a damaged one (missing file, wrong
size or hash) is reported and skipped in favour of the previous one.

With --ckpt_async (the default) training stops only while the state is copied into a staging buffer in
host memory (DCP's async_save with its DefaultStager, which keeps one buffer and copies into it again);
a background thread writes the copy, hashes the files and commits the checkpoint, its collectives on a gloo
group of their own. One is written at a time: the next checkpoint, a rollback, a stop and the end of the
run wait for it.
gpt2repro/weights.py opens one for inference; `launch/export.py` turns one into a single file or a
Hugging Face directory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from gpt2repro import distributed as D
from gpt2repro import rundir
from gpt2repro.errors import first_line
from gpt2repro.model import GPT, MODEL_FIELDS, with_tied, without_tied
from gpt2repro.schedule import periodic
from gpt2repro.schema import Settings, setting, to_json
from gpt2repro.shards import sha256_file, write_json_atomic

META_NAME = "meta.json"
STATE_DIR = "state"
TRAINER_FILE = "trainer.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# DCP in one process (no_dist) warns that it is "assuming the intent is to save in a single process": yes, on
# purpose. Filtered once for the process: a background save warns from its own thread, where catch_warnings
# (which swaps the process's filters) would race the training thread's.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used."""


class PeerMismatch(ValueError):
    """A replica group's peer (gpt2repro/ft.py) trains another run: nothing of its state is taken."""


@dataclass(frozen=True)
class CheckpointSettings(Settings):
    TITLE = "checkpoints and resume"

    ckpt_interval: int = setting(
        1000, "checkpoint every this many steps, at the last and on a stop signal", resumable=True, at_least=1
    )
    keep_ckpts: int = setting(
        3, "the newest checkpoints kept (and those a spike rollback may need)", resumable=True, at_least=1
    )
    ckpt_async: bool = setting(
        True,
        "write checkpoints in the background: training stops only to copy the state to host memory",
        resumable=True,
    )
    resume: str = setting(
        "auto", "auto: the newest intact checkpoint in --out; never; or a checkpoint's PATH", resumable=True
    )
    init_from: str = setting(
        "",
        "start at step 0 from these weights: gpt2..gpt2-xl, a Hugging Face directory, an "
        "exported .pt or a checkpoint (the shape comes from them)",
    )


@dataclass(frozen=True)
class Written:
    """A checkpoint written in the background: its step and path, the seconds from the save's start to its
    commit, and the bytes of the staging copy it was written from."""

    step: int
    path: Path
    write_s: float
    staged_bytes: int


class Checkpointer:
    """A run's checkpoints, and when: every ckpt_interval steps, at the last step and at a stop
    request. It keeps the newest keep_ckpts and, while the newest ones may hold diverged weights,
    the last good one, and those a spike guard's rollback may go back to; and it finds and loads the point a
    run resumes from.

    What a checkpoint holds: model and AdamW state (sharded under FSDP), and in trainer.pt the
    step, tokens, skipped steps, GradScaler state and every rank's RNG state.

    With cfg.ckpt_async, save() returns once the state is staged; `pending` is the checkpoint being written
    (one at most), which poll() and wait() hand back as a Written once committed.
    """

    def __init__(self, run_dir: Path, cfg, raw_model: GPT, optimizer, scaler, info: D.DistInfo, guard=None):
        self.run_dir, self.cfg, self.info = Path(run_dir), cfg, info
        self.raw_model, self.optimizer, self.scaler, self.guard = raw_model, optimizer, scaler, guard
        self.resumed_from: Path | None = None
        self.saved: Path | None = None  # the newest one this process wrote (or is writing)
        self.pending: Future | None = None  # the checkpoint being written in the background, a Future of Written
        self.staged_bytes = 0  # the staging copy's size (host memory held from the first save on)
        self._background = None
        self.why_sync = ""  # why checkpoints are written synchronously although --ckpt_async asked otherwise
        if cfg.ckpt_async:
            self.why_sync = _no_room_to_stage(raw_model, info)
        self.asynchronous = cfg.ckpt_async and not self.why_sync
        if self.asynchronous:  # every rank together: the side group is made collectively
            self._background = (
                D.side_group(info, cfg.collective_timeout_s),
                DefaultStager(staging_options(info.device_type)),
                ThreadPoolExecutor(1, thread_name_prefix="gpt2repro-checkpoint"),
            )

    def due(self, step: int, stop: int) -> bool:
        return periodic(step, self.cfg.ckpt_interval, self.cfg.max_steps) or bool(stop)

    def poll(self) -> Written | None:
        """The checkpoint written in the background, once it is committed (None before, and when there is
        none); its error, as a CheckpointError, if it failed. Never blocks."""
        if self.pending is None or not self.pending.done():
            return None
        return self.wait()

    def wait(self) -> Written | None:
        """Block until the checkpoint being written in the background is committed, and return it (None when
        there is none); a CheckpointError if it failed."""
        pending, self.pending = self.pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Release the staging buffers and the background thread (after wait())."""
        if self._background is not None:
            _, stager, executor = self._background
            executor.shutdown(wait=True)
            stager.close()
            self._background = None

    def save(self, state, consecutive_bad: int = 0) -> Path:
        """Every rank writes its part of the model and optimizer state at once (a collective); retention
        then keeps the last good checkpoint too while the newest ones follow non-finite losses.

        Asynchronous (cfg.ckpt_async): returns once the state is staged, the one before it having been waited
        for; its files are written, hashed and committed in the background (`pending`)."""
        if self.pending is not None:
            raise RuntimeError("a checkpoint is still being written: wait() for it before the next save")
        rng_states = D.gather_objects(rng_state(), self.info)  # collective: every rank takes part
        trainer = self.trainer_state(state) | {"rng": rng_states}
        meta = {
            "config": to_json(self.cfg),
            "model": dataclasses.asdict(self.raw_model.config),
            "world_size": self.info.world_size,
            "tokens": state.tokens,
        }
        needed = {self.last_good(state.step, consecutive_bad), *self.rollback_candidates(state.step)} - {None}
        if self._background is None:
            self.saved = save(self.run_dir, state.step, self.training_state(), trainer, meta, self.info)
            if self.info.is_main:
                prune(self.run_dir, self.cfg.keep_ckpts, needed)
            return self.saved
        group, stager, executor = self._background
        started, step = time.perf_counter(), state.step  # `state` goes on changing while this is written
        trainer = copy.deepcopy(trainer)  # and so may what its parts hold (the guard's window)
        tmp, final = begin(self.run_dir, state.step, self.info)
        training_state = self.training_state()
        self.staged_bytes = state_bytes(training_state)
        upload = _write_state(training_state, tmp, final, self.run_dir, self.info, group, stager)

        def finish() -> Written:
            path = commit(upload, tmp, final, trainer, meta, self.info, group)
            if self.info.is_main:
                prune(self.run_dir, self.cfg.keep_ckpts, needed)
            return Written(step, path, time.perf_counter() - started, self.staged_bytes)

        self.pending, self.saved = executor.submit(finish), final
        return final

    def rollback_candidates(self, step: int) -> list[Path]:
        """With the spike guard on: the checkpoints a rollback after `step` may go back to (one from at least
        rollback_after steps before the streak: train.Stopper.rollback_target), which retention keeps: every one
        from the newest that is rollback_after steps old."""
        if self.guard is None:
            return []
        oldest = newest_before(self.run_dir, step + 1 - self.cfg.rollback_after)  # none yet: all are candidates
        return [p for p in list_steps(self.run_dir) if oldest is None or step_of(p) >= step_of(oldest)]

    def last_good(self, step: int, consecutive_bad: int) -> Path | None:
        """The newest checkpoint whose weights still gave a finite loss: checkpoint j holds the weights
        after update j, which the loss of step j + 1 measures; a streak of consecutive_bad non-finite
        losses ending at `step` therefore began with the weights of step - consecutive_bad."""
        candidates = list_steps(self.run_dir) + ([self.resumed_from] if self.resumed_from else [])
        good = [p for p in candidates if step_of(p) < step - consecutive_bad]
        return max(good, key=step_of) if good else None

    def before(self, step: int) -> Path | None:
        """The newest intact checkpoint of a step before `step`, for a rollback (it never holds anything the
        trouble that began at `step` touched): chosen by rank 0, the same path on every rank."""
        found = None
        if self.info.is_main:
            found = newest_before(self.run_dir, step, intact=True)
        return D.broadcast_object(found, self.info)

    def set_aside_after(self, step: int) -> None:
        """Rank 0 renames the checkpoints of steps after `step` to .rolled-back-step_X: never resumed from,
        never pruned, kept to look at."""
        if self.info.is_main:
            for path in list_steps(self.run_dir):
                if step_of(path) > step:
                    aside = path.with_name(f".rolled-back-{path.name}")
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(path, aside)
        D.barrier(self.info)

    def training_state(self) -> dict:
        """Model and AdamW state as DCP saves and loads it: whole tensors (DDP) or this rank's shards
        (FSDP), keyed by parameter name; the tied output weight once."""
        model_state, optimizer_state = get_state_dict(self.raw_model, self.optimizer)
        return {"model": without_tied(model_state), "optimizer": optimizer_state}

    def trainer_state(self, state) -> dict:
        """trainer.pt's part of `state` (a train.TrainState) and of the run's parts, besides the RNG: the counters,
        the scaler and the spike guard's window (copies: they go on changing)."""
        trainer = {
            "step": state.step,
            "tokens": state.tokens,
            "skipped_steps": state.skipped_steps,
            "spikes": state.spikes,
            "data_offset": state.data_offset,
            "rollbacks": state.rollbacks,
            "scaler": self.scaler.state_dict(),
        }
        if self.guard is not None:
            trainer["guard"] = self.guard.state_dict()
        return trainer

    def load_trainer_state(self, trainer: dict, state) -> None:
        self.scaler.load_state_dict(trainer["scaler"])
        state.step, state.tokens, state.skipped_steps = trainer["step"], trainer["tokens"], trainer["skipped_steps"]
        # A checkpoint from before the spike guard: no spikes, no rollbacks, the data in its own order.
        state.spikes, state.data_offset = trainer.get("spikes", 0), trainer.get("data_offset", 0)
        state.rollbacks = trainer.get("rollbacks", 0)
        if self.guard is not None and "guard" in trainer:
            self.guard.load_state_dict(trainer["guard"])

    def live_state(self, state) -> dict:
        """Everything a replica group needs to go on from this rank's state (gpt2repro/ft.py's heal): model and
        AdamW state (this rank's tensors, local shards under FSDP; views, no copies), trainer.pt's part and this
        rank's RNG."""
        return {
            "run": run_fields(self.cfg),
            "training": local_tensors(self.training_state()),
            "trainer": copy.deepcopy(self.trainer_state(state)),
            "rng": rng_state(),
        }

    def load_live_state(self, received: dict, state) -> None:
        """A peer's live_state (the same place in another replica group: the same shards) into this rank's; a
        PeerMismatch, before anything is loaded, if the peer trains another run."""
        mine, theirs = run_fields(self.cfg), received["run"]
        if diffs := [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]:
            raise PeerMismatch(
                f"this replica group trains another run than the group it heals from ({'; '.join(diffs)}); launch "
                "every group with the same settings."
            )
        loaded = like_template(received["training"], self.training_state())
        set_state_dict(
            self.raw_model,
            self.optimizer,
            model_state_dict=with_tied(loaded["model"]),
            optim_state_dict=loaded["optimizer"],
        )
        self.load_trainer_state(received["trainer"], state)
        set_rng_state(received["rng"])

    def resume(self, state) -> Path | None:
        """Restore model, optimizer, scaler, `state` and RNG from the checkpoint cfg.resume asks for
        (auto: the newest intact one); its path, or None for a fresh run.

        The checkpoint may come from another number of ranks or the other strategy: DCP reshards.
        """
        path = self._find_resume_point()
        if path is None:
            return None
        self.load(path, state)
        self.resumed_from = path
        return path

    def load(self, path: Path, state) -> None:
        """Restore model, optimizer, scaler, spike guard, `state` and RNG from the (checked) checkpoint at path;
        every rank together."""
        saved = read_meta(path)["config"]
        mismatched = [
            f"{f}={saved[f]} (checkpoint) vs {getattr(self.cfg, f)} (config)"
            for f in MODEL_FIELDS
            if saved.get(f) != getattr(self.cfg, f)
        ]
        if mismatched:
            raise ValueError(f"Checkpoint {path} is for another model shape: {', '.join(mismatched)}.")
        loaded = self.training_state()
        load_state(path, loaded, self.info)
        set_state_dict(
            self.raw_model,
            self.optimizer,
            model_state_dict=with_tied(loaded["model"]),
            optim_state_dict=loaded["optimizer"],
        )
        trainer = read_trainer(path)
        self.load_trainer_state(trainer, state)
        rngs = trainer["rng"]
        if len(rngs) == self.info.world_size:  # same world: every rank continues its own random stream
            set_rng_state(rngs[self.info.rank])
        else:  # another world size: fresh streams, still one per rank (dropout masks must differ)
            torch.manual_seed(self.cfg.seed + 1_000_003 * state.step + self.info.rank)

    def _find_resume_point(self) -> Path | None:
        """The checkpoint cfg.resume names (auto: the newest intact one), chosen by rank 0 for all ranks."""
        if self.cfg.resume == "never":
            if list_steps(self.run_dir):
                raise ValueError(
                    f"{self.run_dir} already has checkpoints but --resume never was given; use another --out."
                )
            return None
        found = error = None
        if self.info.is_main:  # hashing a big checkpoint once is enough
            try:
                resume = self.cfg.resume
                found = latest_valid(self.run_dir) if resume == "auto" else check(Path(resume))
            except CheckpointError as e:
                error = str(e)
        found, error = D.broadcast_object((found, error), self.info)
        if error:
            raise CheckpointError(error)
        return found


def run_fields(cfg) -> dict:
    """The fields that make a run what it is (those no resume may change), as config.json holds them."""
    fixed = {f.name for f in dataclasses.fields(cfg) if not f.metadata.get("resumable")}
    return {name: value for name, value in to_json(cfg).items() if name in fixed}


def local_tensors(tree):
    """A state dict with every DTensor as this rank's local tensor (a view: no copy)."""
    if isinstance(tree, dict):
        return {k: local_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(local_tensors(v) for v in tree)
    return tree.to_local() if isinstance(tree, DTensor) else tree


def like_template(received, template):
    """received (local_tensors of a state dict laid out as template is) with template's types: a DTensor of the
    same mesh and placements where template holds one, every tensor on template's device."""
    if isinstance(template, dict) and isinstance(received, dict):
        return {k: like_template(v, template[k]) if k in template else v for k, v in received.items()}
    if isinstance(template, (list, tuple)) and isinstance(received, (list, tuple)) and len(template) == len(received):
        return type(received)(like_template(r, t) for r, t in zip(received, template, strict=True))
    if isinstance(template, DTensor):
        return DTensor.from_local(
            received.to(template.device),
            template.device_mesh,
            template.placements,
            run_check=False,
            shape=template.shape,
            stride=template.stride(),
        )
    if isinstance(template, torch.Tensor) and isinstance(received, torch.Tensor):
        return received.to(template.device)
    return received


def staging_options(device_type: str) -> StagingOptions:
    """How a background checkpoint copies the state: from a GPU into pinned host memory with non-blocking copies
    (DCP's stager synchronizes once after them), on a CPU with plain copies; in the training thread, never
    through shared memory (no other process reads it)."""
    cuda = device_type == "cuda"
    return StagingOptions(
        use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=cuda
    )


def _no_room_to_stage(model: GPT, info: D.DistInfo) -> str:
    """Why this node's host memory cannot hold every local rank's staging copy (the weights and AdamW's two
    moments, as this rank holds them: a bound before the optimizer has state), with half of what is available
    left for everything else; "" where it can (or the memory is unknown). The same on every rank (a collective):
    the slowest node decides."""
    need = 3 * state_bytes(dict(model.named_parameters())) * info.local_world_size
    available = _available_host_bytes()
    short = torch.tensor(int(available is not None and need > available / 2), device=info.device)
    if not D.all_reduce_max(short, info).item():
        return ""
    here = f"{available / 2**30:.1f} GiB available here" if available is not None else "less on another node"
    return (
        f"warning: checkpoints are written synchronously: in the background they need a copy of the state in host "
        f"memory, about {need / 2**30:.1f} GiB for the {info.local_world_size} rank(s) of a node, more than half of "
        f"the {here}; --ckpt_async false chooses this without the warning"
    )


def _available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


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


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / rundir.CHECKPOINTS


def save(run_dir: Path, step: int, state: dict, trainer: dict, meta: dict, info: D.DistInfo) -> Path:
    """Write the checkpoint of `step` now; every rank calls this and gets its path (or the same CheckpointError).

    state: {"model": ..., "optimizer": ...} state dicts, sharded (FSDP) or whole (DDP);
    DCP spreads the writing over the ranks. trainer: rank 0's small objects (torch.save).
    """
    tmp, final = begin(run_dir, step, info)
    return commit(_write_state(state, tmp, final, run_dir, info), tmp, final, trainer, meta, info)


def begin(run_dir: Path, step: int, info: D.DistInfo) -> tuple[Path, Path]:
    """(the temporary directory a checkpoint of `step` is written to, its final name), the temporary one
    emptied of an earlier attempt before any rank writes; every rank together."""
    root = checkpoint_dir(run_dir)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    D.barrier(info)
    return tmp, final


def _write_state(state: dict, tmp: Path, final: Path, run_dir: Path, info: D.DistInfo, group=None, stager=None):
    """DCP writes `state` under tmp: now (a Future already done), or, with a stager, from its staged copy in
    DCP's thread (the Future of that write) once the copy is made. Its error becomes a one-line CheckpointError
    when the Future's result is read."""
    done: Future = Future()
    try:
        if stager is None:
            done.set_result(dcp.save(state, checkpoint_id=tmp / STATE_DIR, no_dist=not info.is_distributed))
            return done
        return dcp.async_save(
            state,
            checkpoint_id=tmp / STATE_DIR,
            process_group=group,
            async_stager=stager,
            no_dist=not info.is_distributed,
        )
    except (Exception, CheckpointException) as e:  # DCP raises the same on every rank
        done.set_exception(CheckpointError(_describe(e, final, run_dir)))
        return done


def commit(written: Future, tmp: Path, final: Path, trainer: dict, meta: dict, info: D.DistInfo, group=None) -> Path:
    """Once DCP's write (`written`) is done on every rank: each rank hashes the files it wrote, and rank 0
    writes trainer.pt, then meta.json with every file's size and sha256, and renames tmp to final. Every rank
    takes part (on `group`: the side group of a background save) and gets final, or the same CheckpointError;
    a failed checkpoint's temporary directory is removed."""
    run_dir = final.parent.parent
    error = None
    try:
        written.result()
    except CheckpointError as e:
        error = str(e)
    except (Exception, CheckpointException) as e:  # DCP raises the same on every rank
        error = _describe(e, final, run_dir)
    D.barrier(info, group)  # rank 0 writes DCP's metadata last
    entries = {}
    if error is None:
        try:  # each rank hashes the files it wrote (still in its page cache); rank 0 also the rest
            files = sorted(p for p in (tmp / STATE_DIR).rglob("*") if p.is_file())
            entries = {str(p.relative_to(tmp)): _entry(p) for p in files if _writer(p.name, info) == info.rank}
        except OSError as e:
            error = _describe(e, final, run_dir)
    gathered = D.gather_objects((entries, error), info, group)
    error = next((err for _, err in gathered if err), None)
    if info.is_main and error is None:
        try:
            files = {k: v for part, _ in gathered for k, v in part.items()}
            _commit(tmp, final, final.parent, trainer, files, meta, step_of(final))
        except Exception as e:
            error = _describe(e, final, run_dir)
    error = D.broadcast_object(error, info, group)
    if error:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(error)
    return final


def state_bytes(state) -> int:
    """The bytes of the tensors in a (nested) state dict as this rank holds them (its shards under FSDP)."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if torch.is_tensor(state):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def _writer(name: str, info: D.DistInfo) -> int:
    """The rank that wrote a DCP file (named __RANK_N.distcp); 0 for the metadata."""
    match = re.match(r"^__(\d+)_\d+\.distcp$", name)
    rank = int(match.group(1)) if match else 0
    return rank if rank < info.world_size else 0


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _commit(tmp: Path, final: Path, root: Path, trainer: dict, entries: dict, meta: dict, step: int) -> None:
    with open(tmp / TRAINER_FILE, "wb") as f:
        torch.save(trainer, f)
        f.flush()
        os.fsync(f.fileno())
    entries[TRAINER_FILE] = _entry(tmp / TRAINER_FILE)
    write_json_atomic(tmp / META_NAME, {**meta, "step": step, "files": dict(sorted(entries.items()))})
    if final.exists():  # the same step again (a rerun after a crash): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)


def _describe(error: BaseException, final: Path, run_dir: Path) -> str:
    """One line for a failed save; a full disk is named as such (torch and DCP wrap the OSError)."""
    os_error = _find_os_error(error)
    if os_error is None:
        message = (str(error).strip().splitlines() or [""])[0]  # may be empty: the type already names it
        return f"Could not write checkpoint {final}: {type(error).__name__}: {message}"
    previous = latest_valid(run_dir, report=None)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return f"Could not write checkpoint {final} ({os_error.strerror or os_error}); {kept}."


def _find_os_error(error: BaseException | None, depth: int = 0) -> OSError | None:
    if error is None or depth > 5:
        return None
    if isinstance(error, OSError):
        return error
    inner = [error.__cause__, error.__context__]
    if isinstance(error, CheckpointException):
        inner += [exc for exc, _trace in error.failures.values()]
    for e in inner:
        if found := _find_os_error(e, depth + 1):
            return found
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def problem(path: Path) -> str | None:
    """Why the checkpoint at path is unusable, or None when it is complete and intact."""
    if not path.is_dir():
        return f"checkpoint {path} {'is not a directory' if path.exists() else 'does not exist'}"
    meta_file = path / META_NAME
    if not meta_file.is_file():
        return f"checkpoint {path} has no {META_NAME} (incomplete)"
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        return f"checkpoint {path} has a corrupt {META_NAME}"
    for name, entry in meta["files"].items():
        f = path / name
        if not f.is_file():
            return f"checkpoint {path} is missing {name}"
        if f.stat().st_size != entry["bytes"]:
            return f"checkpoint {path}: {name} is {f.stat().st_size} bytes, expected {entry['bytes']} (truncated)"
        if sha256_file(f) != entry["sha256"]:
            return f"checkpoint {path}: {name} does not match its sha256 (corrupt)"
    return None


def list_steps(run_dir: Path) -> list[Path]:
    """Final-named checkpoint directories, oldest first (temporary ones excluded)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_valid(run_dir: Path, report=print) -> Path | None:
    """The newest intact checkpoint; each damaged newer one is reported in one line and skipped."""
    for path in reversed(list_steps(run_dir)):
        why = problem(path)
        if why is None:
            return path
        if report is not None:
            report(f"warning: {why}; falling back to the previous checkpoint")
    return None


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint: its config, model config, world size, strategy, files."""
    return json.loads((Path(path) / META_NAME).read_text())


def read_trainer(path: Path) -> dict:
    """trainer.pt of a checkpoint: step, tokens, GradScaler state, every rank's RNG state."""
    return torch.load(Path(path) / TRAINER_FILE, map_location="cpu", weights_only=True)


def load_state(path: Path, state: dict, info: D.DistInfo | None = None) -> None:
    """Fill `state` (state dicts laid out for this world: sharded or whole) in place from the checkpoint.

    With info, every rank calls this together; without, one process reads what it needs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=Path(path) / STATE_DIR, no_dist=info is None or not info.is_distributed)
    except (Exception, CheckpointException) as e:  # DCP raises the same on every rank, whichever failed
        os_error = _find_os_error(e)
        detail = os_error.strerror if os_error else first_line(e)
        raise CheckpointError(
            f"Could not read checkpoint {path} ({detail}); pass another one with --resume PATH."
        ) from None


def check(path: Path) -> Path:
    """path, when it is an intact checkpoint; else a CheckpointError saying what is wrong."""
    why = problem(Path(path))
    if why is not None:
        raise CheckpointError(why[0].upper() + why[1:] + "; pass another checkpoint or --resume auto.")
    return Path(path)


def newest_before(run_dir: Path, step: int, intact: bool = False) -> Path | None:
    """The newest checkpoint of a step before `step` (intact: the newest whose files all check out)."""
    return next((p for p in reversed(list_steps(run_dir)) if step_of(p) < step and not (intact and problem(p))), None)


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def prune(run_dir: Path, keep: int, keep_also: set[Path] = frozenset()) -> None:
    """Keep the newest `keep` complete checkpoints and those in keep_also; never delete the newest one."""
    # Hashing every one at each save would cost minutes for the big models, so full integrity
    # checks are left to resume.
    intact = complete_steps(run_dir)
    for path in intact[: max(0, len(intact) - max(1, keep))]:
        if path not in keep_also:
            shutil.rmtree(path, ignore_errors=True)
    for stale in checkpoint_dir(run_dir).glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve_path(run_dir_or_ckpt: str | os.PathLike) -> Path:
    """A checkpoint directory as given, or the newest one of a run directory; either way checked
    intact (every file hashed once), else a CheckpointError."""
    path = Path(run_dir_or_ckpt)
    if (path / META_NAME).is_file():
        return check(path)
    newest = latest_valid(path)
    if newest is None:
        raise CheckpointError(f"{path} is neither a checkpoint nor a run directory with an intact checkpoint.")
    return newest


def complete_steps(run_dir: Path) -> list[Path]:
    """Checkpoints renamed into place with their meta.json, oldest first; not hashed."""
    return [p for p in list_steps(run_dir) if (p / META_NAME).is_file()]


def newest_complete(run_dir_or_ckpt: str | os.PathLike) -> Path:
    """A checkpoint directory as given, or the newest complete one of a run directory, without
    hashing anything: for reading its meta.json alone."""
    path = Path(run_dir_or_ckpt)
    if (path / META_NAME).is_file():
        return path
    complete = complete_steps(path)
    if not complete:
        raise CheckpointError(f"{path} is neither a checkpoint nor a run directory with a complete checkpoint.")
    return complete[-1]
