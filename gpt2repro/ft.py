"""Per-step fault tolerance across replica groups, with torchft: a lost group costs a step, not a restart.

A run of --ft_groups N is N replica groups, each an ordinary torchrun job (DDP or FSDP inside it) with files of
its own in --out/group_G. Before every step each group asks torchft's lighthouse for the quorum (the groups
alive); the live groups take the step together, their gradients summed across groups by one all-reduce per
step. When a group dies, the step it was part of is not committed anywhere (torchft's should_commit) and the
survivors take it again without it, once the lighthouse has stopped counting the lost group (its heartbeat
timeout); nobody restarts. A group that comes back joins the quorum behind the others and heals from a live
peer before its first step: weights, AdamW, scaler, spike guard, data position and RNG, sent over HTTP by the
peer's rank of the same place (torchft's checkpoint transport); no checkpoint is read.

The step's global batch is fixed, whoever is alive: the data order is a pure function of (seed, step), and the
batch is N x (group ranks) x grad_accum_steps micro-batches, one "share" of grad_accum_steps micro-batches per
(group, rank) place. With k groups alive, the live group of quorum index q computes the shares of groups q,
q + k, q + 2k, ... (gradient accumulation makes up for the missing ones), each micro-batch's loss divided by
N x grad_accum_steps; within a group DDP/FSDP average over its ranks and across groups the all-reduce sums, so
every step's gradient is the mean over the same micro-batches as without failures: the losses differ only by
the order of the sums. With dropout, each share's masks are drawn from a generator seeded by (seed, step,
share), so they do not depend on which group computes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch.distributed import ReduceOp

from gpt2repro.checkpoint import PeerMismatch, run_fields
from gpt2repro.errors import first_line
from gpt2repro.schema import Settings, setting

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's own variable
HEAL_KEY = "gpt2repro"
QUORUM_ATTEMPT_S = 5.0


@dataclass(frozen=True)
class FaultToleranceSettings(Settings):
    """Replica groups under torchft (gpt2repro/ft.py; docs/cluster.md, fault tolerance)."""

    TITLE = "fault tolerance across replica groups (torchft)"

    ft_groups: int = setting(
        0,
        "replica groups that train this run, each a torchrun job of its own; the others go on when one is lost, "
        "and it heals from them when it comes back (0: off)",
        at_least=0,
    )
    ft_group: int = setting(
        0, "this job's replica group, 0 to ft_groups - 1 (its files: --out/group_N)", resumable=True, at_least=0
    )
    ft_lighthouse: str = setting(
        "", f"the torchft lighthouse, HOST:PORT (empty: ${LIGHTHOUSE_ENV})", resumable=True, metavar="HOST:PORT"
    )
    ft_min_groups: int = setting(1, "the fewest replica groups that may take a step", resumable=True, at_least=1)
    ft_timeout_s: float = setting(
        30.0,
        "how long the live groups wait on a lost one (a collective, a quorum, a heal) before going on without it",
        resumable=True,
        at_least=1,
    )

    def problems(self) -> list[str]:
        if not self.ft_groups:
            return []
        problems = []
        if self.ft_group >= self.ft_groups:
            problems.append(f"ft_group must be below ft_groups ({self.ft_groups}), got {self.ft_group}")
        if self.ft_min_groups > self.ft_groups:
            problems.append(f"ft_min_groups ({self.ft_min_groups}) must be at most ft_groups ({self.ft_groups})")
        return problems


def groups(cfg) -> int:
    """How many replicas of a group's ranks the global batch is split over (1 without fault tolerance)."""
    return max(cfg.ft_groups, 1)


def group_dir(out: str | os.PathLike, cfg) -> Path:
    """Where this job's files go: --out itself, or under fault tolerance its group's own directory in it."""
    return Path(out) / f"group_{cfg.ft_group}" if cfg.ft_groups else Path(out)


def lighthouse_address(cfg) -> str:
    """The lighthouse's URL, from --ft_lighthouse or $TORCHFT_LIGHTHOUSE; a ValueError naming both if neither."""
    address = cfg.ft_lighthouse or os.environ.get(LIGHTHOUSE_ENV, "")
    if not address:
        raise ValueError(
            f"--ft_groups {cfg.ft_groups} needs the torchft lighthouse: pass --ft_lighthouse HOST:PORT or set "
            f"{LIGHTHOUSE_ENV} (start one with: torchft_lighthouse --min_replicas 1)."
        )
    return address if "://" in address else f"http://{address}"


def shares(group_world: int, groups_total: int, live: int, index: int, rank: int) -> list[int]:
    """The shares (data-parallel places of the full layout, group x group_world + rank) that rank `rank` of the
    live group of quorum index `index` computes when `live` of groups_total groups are alive."""
    return [group * group_world + rank for group in range(index, groups_total, live)]


def dropout_seed(seed: int, step: int, share: int) -> int:
    """The seed of one share's dropout masks at a step: the same whichever group computes it."""
    return (seed * 1_000_003 + step) * 65_537 + share


@dataclass
class Quorum:
    """This step's replica groups: how many are alive, this one's index among them, and what it took."""

    live: int
    index: int
    quorum_id: int
    healed_from_step: int | None = None  # this group's step before it healed, if it did
    seconds: float = 0.0  # the quorum (and the heal) took


class Replicas:
    """This rank's place among the replica groups, through torchft's Manager: the quorum before each step (which
    heals this group when it is behind), the shares it computes, the all-reduce across groups and the commit.

    heal_state() / load_heal_state(dict) give and take everything a group needs to go on from a peer's state (the
    Checkpointer's, plus this rank's RNG); they are set by train.setup once the run's parts exist."""

    def __init__(self, cfg, layout, heal_state, load_heal_state):
        quiet_torchft()  # before torchft's Rust half reads RUST_LOG, at its import
        try:
            from torchft import Manager  # noqa: PLC0415 (only runs with --ft_groups need torchft)
        except ImportError:
            raise ValueError("--ft_groups needs torchft: pip install 'gpt2repro[ft]' (or torchft).") from None

        self.cfg, self.layout, info = cfg, layout, layout.info
        self.address = lighthouse_address(cfg)
        self.timeout = timedelta(seconds=cfg.ft_timeout_s)
        # One quorum request waits at most this long: a lighthouse that restarts is asked again, until ft_timeout_s.
        self.attempt = timedelta(seconds=min(cfg.ft_timeout_s, QUORUM_ATTEMPT_S))
        store_addr, store_port, self._store = _group_store(info)
        try:
            self.manager = Manager(
                # A collective (or the connecting of a new quorum) waits half the bound on a lost group: the retry's
                # quorum then fits in the rest.
                pg=_cross_group_pg(info.device_type, self.timeout / 2),
                load_state_dict=None,
                state_dict=None,
                min_replica_size=cfg.ft_min_groups,
                use_async_quorum=False,  # heal before the step's forward, not during it
                timeout=self.timeout,
                quorum_timeout=self.timeout,
                connect_timeout=self.timeout,
                rank=info.rank,
                world_size=info.world_size,
                store_addr=store_addr,
                store_port=store_port,
                lighthouse_addr=self.address,
                replica_id=f"group_{cfg.ft_group}",
                hostname=socket.gethostname(),
                init_sync=False,  # every group builds the same weights from the seed
            )
        except Exception as e:  # noqa: BLE001 (torchft's Rust errors are plain RuntimeErrors)
            raise ValueError(
                f"replica group {cfg.ft_group} could not reach the torchft lighthouse at {self.address}: "
                f"{first_line(e)}; start it (torchft_lighthouse --min_replicas 1 --bind [::]:PORT) or fix "
                f"--ft_lighthouse / ${LIGHTHOUSE_ENV}."
            ) from None
        self.healed_from: int | None = None  # set by a heal: the step this group was at

        def heal(received: dict) -> None:
            self.healed_from = self.healed_from if self.healed_from is not None else self.step_before
            load_heal_state(received)

        self.step_before = 0
        self.manager.register_state_dict_fn(HEAL_KEY, heal, heal_state)
        self.quorum: Quorum | None = None
        self.said_waiting = False

    def start(self, step: int) -> None:
        """The manager's step is the run's (a resumed group counts from its checkpoint)."""
        self.manager.load_state_dict({"step": step, "batches_committed": step * self.cfg.ft_groups})

    def join(self, state) -> Quorum:
        """The quorum of the next step: waits for the lighthouse (at most ft_timeout_s without one, or with fewer
        than ft_min_groups groups), healing this group from a live peer first when it is behind. state: the
        run's TrainState, which a heal replaces."""
        started, self.step_before, self.healed_from = time.perf_counter(), state.step, None
        while True:
            try:
                self.manager.start_quorum(timeout=self.attempt)
                live, index = self.manager.num_participants(), self.manager.participating_rank()
            except PeerMismatch:
                raise
            except Exception as e:  # noqa: BLE001
                self.manager._quorum_future = None  # torchft re-raises a failed quorum at the next one otherwise
                if self._pause_within(started, 1.0):
                    continue
                raise ReplicaGroupError(
                    f"replica group {self.cfg.ft_group}: no quorum of at least {self.cfg.ft_min_groups} group(s) "
                    f"from the lighthouse at {self.address} within {time.perf_counter() - started:.0f} s "
                    f"({first_line(e)}); restart the lighthouse or the lost groups, then this group (it heals or "
                    "resumes)."
                ) from None
            if self.manager.errored() is not None:  # connecting to the quorum's groups, or healing, failed: a peer died
                if self._pause_within(started, 0.1):
                    continue
                error = first_line(self.manager.errored().original_exception)
                raise ReplicaGroupError(
                    f"replica group {self.cfg.ft_group} could not join the live groups (connect, or heal from a "
                    f"peer) within {self.cfg.ft_timeout_s:g} s ({error}); restart it to try again, or resume every "
                    "group from its checkpoints."
                )
            if self.manager.current_step() == 0 and live < self.cfg.ft_groups:  # nobody has trained yet: a run
                self._say_waiting(live)  # starts with all its groups, if they come in time
                if self._pause_within(started, 0.25):
                    continue
            if live < self.cfg.ft_min_groups:  # the lighthouse's --min_replicas is lower than this run's
                if self._pause_within(started, 0.5):
                    continue
                raise ReplicaGroupError(
                    f"replica group {self.cfg.ft_group}: only {live} of the {self.cfg.ft_groups} groups are alive, "
                    f"fewer than --ft_min_groups {self.cfg.ft_min_groups}, for {time.perf_counter() - started:.0f} "
                    "s; restart the lost groups (they heal from this one), or lower --ft_min_groups."
                )
            break
        previous = self.quorum
        self.quorum = Quorum(live, index, self.manager._quorum_id, self.healed_from, time.perf_counter() - started)
        if previous is None or previous.quorum_id != self.quorum.quorum_id:  # every member's quorum is new to it
            self.check_same_run()
        return self.quorum

    def _pause_within(self, started: float, pause: float) -> bool:
        """Sleep `pause` seconds (at most what is left of ft_timeout_s since `started`) and say whether to try
        again; False once ft_timeout_s is spent."""
        left = self.cfg.ft_timeout_s - (time.perf_counter() - started)
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        return True

    def _say_waiting(self, live: int) -> None:
        """Once, from the group's first rank: the first step waits for the groups that have not started yet."""
        if not self.said_waiting and self.layout.info.is_main:
            print(
                f"replica group {self.cfg.ft_group}: {live} of {self.cfg.ft_groups} groups have started; "
                f"waiting up to {self.cfg.ft_timeout_s:g} s for the others before the first step",
                flush=True,
            )
        self.said_waiting = True

    def check_same_run(self) -> None:
        """Every live group trains the same run: each setting no resume may change, the group's ranks and its
        batch, as one hash each, compared across the groups by their largest and smallest (two all-reduces, at
        each new quorum: groups that started together never heal, so no peer's state is ever compared). A
        PeerMismatch naming the settings that differ; a peer lost meanwhile fails the step instead."""
        fingerprint = {**run_fields(self.cfg), "ranks per group": self.layout.dp_size}
        fingerprint["sequences per rank and step"] = self.cfg.batch_size * self.cfg.grad_accum_steps
        names = sorted(fingerprint)
        hashes = [_hash(fingerprint[name]) for name in names]
        largest, smallest = torch.tensor(hashes, dtype=torch.float64), torch.tensor(hashes, dtype=torch.float64)
        self.manager.allreduce(largest, reduce_op=ReduceOp.MAX).wait()
        self.manager.allreduce(smallest, reduce_op=ReduceOp.MIN).wait()
        if self.manager.errored() is not None:
            return
        if differ := [name for name, a, b in zip(names, largest.tolist(), smallest.tolist(), strict=True) if a != b]:
            raise PeerMismatch(
                f"replica group {self.cfg.ft_group}: the live groups were launched with different settings "
                f"({', '.join(differ)} differ); launch every group with the same settings."
            )

    def shares(self) -> list[int]:
        """The shares of the batch this rank computes at this quorum's step."""
        layout = self.layout
        return shares(layout.dp_size, self.cfg.ft_groups, self.quorum.live, self.quorum.index, layout.dp_rank)

    def reduce_and_commit(self, gradients: list[torch.Tensor], loss_sum: torch.Tensor) -> bool:
        """Sum the gradients (this rank's tensors: local shards under FSDP) and the loss across the live groups,
        in one all-reduce, then ask torchft whether every live group may take the step: False when a group was
        lost during it (the gradients are then not to be used)."""
        flat = torch.cat([g.reshape(-1) for g in gradients] + [loss_sum.reshape(1)])
        self.manager.allreduce(flat, reduce_op=ReduceOp.SUM).wait()
        committed = self.manager.should_commit(timeout=self.timeout)
        if committed:
            offset = 0
            for g in gradients:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            loss_sum.copy_(flat[offset])
        return committed

    def close(self) -> None:
        self.manager.shutdown(wait=False)


class ReplicaGroupError(ValueError):
    """This replica group cannot go on: the message says why and what to do."""


def _hash(value) -> float:
    """A setting's value as a float64 that holds it exactly (50 bits of its sha256)."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    return float(int.from_bytes(digest[:8], "big") >> 14)


def quiet_torchft() -> None:
    """torchft logs every quorum and commit at INFO, from Python and from Rust: the run's own records and lines
    say what happened instead (Rust's warnings still reach the console)."""
    os.environ.setdefault("RUST_LOG", "warn")
    # Its Python loggers too, errors included: a lost peer's failed collective is logged with a traceback there,
    # and is this run's "not taken" record and line here.
    for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # A heal's tensors are read from the HTTP response's bytes, which torch warns are read-only; they are copied.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")


def _group_store(info):
    """The group's TCPStore that torchft's managers meet in (torchrun's; one of its own for a lone process), by an
    address the other groups reach too: the other groups build the process group across groups on the store of
    one of them."""
    here = socket.gethostname()
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        address = os.environ["MASTER_ADDR"]
        return (here if address in ("localhost", "127.0.0.1", "::1") else address), int(os.environ["MASTER_PORT"]), None
    store = torch.distributed.TCPStore(here, 0, 1, True, wait_for_workers=False)
    return here, store.port, store


def _cross_group_pg(device_type: str, timeout: timedelta):
    """The process group across replica groups, which torchft rebuilds for each new quorum: NCCL between GPUs,
    gloo between CPUs."""
    import torchft  # noqa: PLC0415

    if device_type == "cuda":
        return torchft.ProcessGroupNCCL(timeout=timeout)
    return torchft.ProcessGroupGloo(timeout=timeout)


def describe_launch(cfg) -> str:
    """The model line's note of this job's place (empty without fault tolerance)."""
    if not cfg.ft_groups:
        return ""
    return f", replica group {cfg.ft_group} of {cfg.ft_groups} (torchft, at least {cfg.ft_min_groups} alive)"


def describe(quorum: Quorum) -> dict:
    """The record of a changed quorum (metrics.jsonl)."""
    record = {"ft_groups_live": quorum.live, "ft_quorum_s": quorum.seconds}
    if quorum.healed_from_step is not None:
        record["ft_healed_from_step"] = quorum.healed_from_step
    return record
