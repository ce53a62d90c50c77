"""The loss-spike guard: skip an update whose loss jumps far above its recent level.

llm.c's outlier detector (llmc/outlier_detector.h, -sl/-sg) in spirit, kept on the device, with a baseline
that bad steps cannot move. The window holds the last `window` finite, accepted steps' loss (the mean over
ranks) and global gradient norm, from the first step on. A step is judged once the lr warmup is over (and
the window holds MIN_HISTORY steps): its z-score is its distance above the window's median, in units of the
window's step-to-step noise (the median absolute difference of consecutive values, scaled to a standard
deviation). Both are medians: a bad step that slips under the threshold moves neither, and a slow trend
(the loss falling through the warmup) inflates neither; a mean and standard deviation over the same window
are pulled up by every bad step they take in, and by the trend. A step whose loss z-score exceeds zscore
(or, when grad_zscore is given, whose grad norm's exceeds that) is a spike: its update is skipped through the
path non-finite steps already take (the GradScaler's found-inf flag, which the fused optimizers read on the
device; the loss scale left as it was: skip_update), and it stays out of the window. Every rank computes the
same decision from the same reduced numbers. A loss or gradient norm far *below* its level is no spike. The
grad norm is not judged by default: clipping already bounds what one such step does, and healthy runs here
reached grad-norm z-scores of 39, where their loss never passed 4.6.

A skipped step is not counted: the batch is skipped, not the step. The loop reads the guard's verdict (one host
sync per step, two booleans) and, on a spike, takes the same step number again with the next batch, so that a
run trains max_steps updates on the lr schedule of a clean run (skipping 30 of 300 steps cost this project's
300-step runs 1% to 1.5% of final val loss; see benchmarks/spike_guard.py).

When spikes persist (rollback_after in a row: a long bad stretch of data, or weights that updates below the
threshold already damaged, so that every clean step looks like a spike), skipping is not enough: at the step
the streak reaches rollback_after, train.fit rolls back to the newest checkpoint from before the streak and
moves the data past everything read since (PaLM's remedy: restart before the spike, skip its batches). The
checkpoint's window comes back with its weights (the level it judges against is theirs), and the guard judges
every step after a rollback, warmup or not: it is never blind where the rest of a bad stretch may follow.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gpt2repro.schema import Settings, setting

MIN_HISTORY = 16  # steps in the window before any is judged (with a shorter warmup the guard starts there)
NOISE_PER_DIFFERENCE = 0.9539  # median |a - b| of two independent N(0, 1) draws: sqrt(2) * 0.6745
MIN_NOISE = 1e-3  # the noise is taken as at least this fraction of the level: a flat series is no license


@dataclass(frozen=True)
class GuardSettings(Settings):
    """Skip the update of a step whose loss lies more than spike_zscore noise units above the median of the last
    spike_window accepted steps (judged from the end of the lr warmup), or whose grad norm does by
    spike_grad_zscore; after rollback_after consecutive skips, roll back to a checkpoint from before them and move
    the data past them, at most max_rollbacks times. The thresholds: benchmarks/spike_guard.py's healthy and
    poisoned runs (docs/cluster.md, loss spikes)."""

    TITLE = "guard"

    spike_zscore: float = setting(
        8.0, "skip a step whose loss z-score passes this (0: the guard is off)", resumable=True, at_least=0
    )
    spike_grad_zscore: float = setting(
        0.0, "skip a step whose grad norm z-score passes this (0: measured, not judged)", resumable=True, at_least=0
    )
    spike_window: int = setting(128, "accepted steps the baseline is taken over (llm.c's window)", at_least=MIN_HISTORY)
    rollback_after: int = setting(32, "consecutive skipped steps that roll the run back", resumable=True, at_least=1)
    max_rollbacks: int = setting(3, "rollbacks before the run stops with an error", resumable=True, at_least=0)
    max_nonfinite_steps: int = setting(
        5, "consecutive steps with non-finite gradients before the run stops", resumable=True, at_least=1
    )


class SpikeGuard:
    def __init__(
        self,
        zscore: float,
        window: int,
        device: str,
        judge_after: int = 0,
        rollback_after: int = 0,
        grad_zscore: float = 0.0,
    ):
        self.rollback_after = rollback_after  # 0: never due
        # The loss's threshold and the grad norm's (0: its z-score is measured, never judged).
        self.thresholds = torch.tensor([zscore, grad_zscore or float("inf")], device=device)
        self.values = torch.full((2, window), float("nan"), device=device)  # (loss, grad norm) accepted, a ring
        self.count = torch.zeros((), dtype=torch.long, device=device)  # accepted steps seen
        self.judge_after = torch.full((), judge_after, dtype=torch.long, device=device)  # the warmup, or less
        self.max_z = torch.zeros(2, device=device)  # the largest z-scores (loss, grad norm) since the last log step
        self.streak = torch.zeros((), dtype=torch.long, device=device)  # consecutive spikes up to now
        self.streak_start = torch.zeros((), dtype=torch.long, device=device)  # the step of its first one
        self.spike = torch.zeros((), dtype=torch.bool, device=device)  # the last step's verdict
        self.z = torch.zeros(2, device=device)  # and its z-scores

    @property
    def window(self) -> int:
        return self.values.shape[1]

    def baseline(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(level, noise) of loss and grad norm over the window: its median, and the median absolute difference
        of consecutive values as a standard deviation (ring neighbours are consecutive accepted steps, but
        one pair where the ring wraps: one difference among window - 1, which the median ignores)."""
        level = self.values.nanmedian(1).values
        differences = (self.values[:, 1:] - self.values[:, :-1]).abs()  # NaN where a slot is still empty
        noise = differences.nanmedian(1).values / NOISE_PER_DIFFERENCE
        return level, torch.maximum(noise, MIN_NOISE * level.abs()).clamp_min(1e-12)

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Whether step `step` (its loss averaged over ranks, its global grad norm) is a spike: a 0-d bool
        tensor on the device. Updates the window and the streak; never syncs with the host."""
        x = torch.stack([loss.float(), grad_norm.float()])
        finite = torch.isfinite(x)  # a finite loss is judged even where the gradients overflowed (float16)
        judged = (step > self.judge_after) & (self.count >= MIN_HISTORY)
        level, noise = self.baseline()
        z = torch.where(finite & judged, (x - level) / noise, 0.0)
        self.max_z = torch.maximum(self.max_z, z)
        spike = (z > self.thresholds).any()
        accept = finite.all() & ~spike
        slot = (self.count % self.window).view(1)  # the oldest accepted step's place, once the ring is full
        kept = torch.where(accept, x, self.values.index_select(1, slot).squeeze(1))
        self.values.index_copy_(1, slot, kept[:, None])
        self.count += accept.long()
        self.streak_start = torch.where(spike & (self.streak == 0), step, self.streak_start)
        self.streak = torch.where(spike, self.streak + 1, 0)
        self.spike, self.z = spike, z
        return spike

    def verdict(self) -> tuple[bool, bool]:
        """(whether the last step checked was a spike, whether a rollback is due: rollback_after in a row), read
        on the host: one sync."""
        due = (self.streak >= self.rollback_after) if self.rollback_after else torch.zeros_like(self.spike)
        spike, due = torch.stack([self.spike, due]).tolist()
        return spike, due

    def last_z(self) -> float:
        """The last step's z-score: its loss's, or its grad norm's where that one is judged and the larger."""
        judged = torch.isfinite(self.thresholds)
        return float(torch.where(judged, self.z, float("-inf")).max())

    def after_rollback(self, to_step: int) -> None:
        """Judge every step from `to_step` on (after the checkpoint's own state was loaded): warmup or not."""
        self.judge_after.clamp_(max=to_step)
        self.spike.fill_(False)

    def take_max_z(self) -> dict[str, float]:
        """The largest z-scores of loss and grad norm since the last call (a host sync: at log steps only)."""
        loss_z, grad_z = self.max_z.tolist()
        self.max_z.zero_()
        return {"max_z": loss_z, "max_grad_z": grad_z}

    def state_dict(self) -> dict:
        return {
            "values": self.values.to("cpu", copy=True),  # a copy: a checkpoint written later holds this step's
            "count": int(self.count),
            "streak": int(self.streak),
            "streak_start": int(self.streak_start),
            "judge_after": int(self.judge_after),
            "baseline": "median",
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["values"].shape) != tuple(self.values.shape):  # another window: start it afresh
            return
        values = state["values"].clone()
        if state.get("baseline") != "median":  # the mean/std guard's ring: zeros where nothing was accepted
            values[:, min(state["count"], self.window) :] = float("nan")
        self.values.copy_(values)
        self.count.fill_(state["count"])
        self.streak.fill_(state["streak"])
        self.streak_start.fill_(state["streak_start"])
        self.judge_after.fill_(min(int(self.judge_after), state.get("judge_after", int(self.judge_after))))


@contextmanager
def skip_update(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, skip: torch.Tensor):
    """Around scaler.step(optimizer) and scaler.update(), after scaler.unscale_(optimizer): the update is skipped
    when `skip` (a 0-d bool tensor) holds, on the device, by folding it into the found-inf flag the optimizer
    reads. A spike is no overflow: a step skipped for it alone leaves the loss scale and its growth count as they
    were (under float16 each such skip would otherwise halve the scale: 30 skips took 8192 to 2^-16), even where
    the spike's own gradients overflowed; non-finite gradients of a step that is no spike still back it off."""
    found_infs = list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())
    scale, growth = scaler._scale.clone(), scaler._growth_tracker.clone()
    for found in found_infs:
        found.copy_(torch.maximum(found, skip.to(found.dtype)))
    yield
    scaler._scale.copy_(torch.where(skip, scale, scaler._scale))
    scaler._growth_tracker.copy_(torch.where(skip, growth, scaler._growth_tracker))
