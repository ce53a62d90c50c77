"""The loss-spike guard: skip an update whose loss or gradient norm jumps far above its recent level.

llm.c's outlier detector (llmc/outlier_detector.h, -sl/-sg) in spirit, kept on the device: the
last `window` finite, accepted steps' loss (the mean over ranks) and global gradient norm, and for
each new step their z-scores against that window. A step whose either z-score exceeds the
threshold, once the window is full and the lr warmup over, is a spike: its update is skipped through
the path non-finite steps already take (the GradScaler's found-inf flag, which the fused optimizers
read on the device; the loss scale left as it was), and it is not added to the window. Every rank
computes the same decision from the same reduced numbers, with no host sync. A loss or gradient norm
far *below* its level is no spike.

When spikes persist (rollback_after consecutive ones: a long bad stretch of data, or weights that
updates below the threshold already damaged, so that every clean step looks like a spike), skipping
is not enough: train.fit rolls back to the newest checkpoint from before the streak and moves the
data past everything read since (PaLM's remedy: restart before the spike, skip its batches).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class SpikeGuard:
    def __init__(self, zscore: float, window: int, device: str, after_step: int = 0):
        self.zscore, self.window, self.after_step = zscore, window, after_step  # after_step: the lr warmup
        self.values = torch.zeros(2, window, device=device)  # (loss, grad norm) of the accepted steps, a ring
        self.count = torch.zeros((), dtype=torch.long, device=device)  # accepted steps seen
        self.max_z = torch.zeros((), device=device)  # the largest z-score since the last log step
        self.streak = torch.zeros((), dtype=torch.long, device=device)  # consecutive spikes up to now
        self.streak_start = torch.zeros((), dtype=torch.long, device=device)  # the step of its first one

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Whether step `step` (its loss averaged over ranks, its global grad norm) is a spike: a 0-d bool
        tensor on the device. Updates the window and the streak of spikes; never syncs with the host."""
        x = torch.stack([loss.float(), grad_norm.float()])
        finite = torch.isfinite(x).all()
        warm = step > self.after_step  # the lr warmup's steps are neither judged nor part of the window
        full = warm & (self.count >= self.window)
        mean, std = self.values.mean(1), self.values.std(1)
        z = torch.where(finite, (x - mean) / std.clamp_min(1e-12), 0.0)
        z_max = torch.where(full, z.max(), 0.0)
        self.max_z = torch.maximum(self.max_z, z_max)
        spike = full & finite & (z_max > self.zscore)
        accept = warm & finite & ~spike
        slot = (self.count % self.window).view(1)  # the oldest accepted step's place, once the ring is full
        kept = torch.where(accept, x, self.values.index_select(1, slot).squeeze(1))
        self.values.index_copy_(1, slot, kept[:, None])
        self.count += accept.long()
        self.streak_start = torch.where(spike & (self.streak == 0), step, self.streak_start)
        self.streak = torch.where(spike, self.streak + 1, 0)
        return spike

    def take_max_z(self) -> float:
        """The largest z-score since the last call (a host sync: at log steps only)."""
        value = float(self.max_z)
        self.max_z.zero_()
        return value

    def state_dict(self) -> dict:
        return {"values": self.values.cpu(), "count": int(self.count), "streak": int(self.streak),
                "streak_start": int(self.streak_start)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["values"].shape) != tuple(self.values.shape):  # another window: start it afresh
            return
        self.values.copy_(state["values"])
        self.count.fill_(state["count"])
        self.streak.fill_(state["streak"])
        self.streak_start.fill_(state["streak_start"])


@contextmanager
def skip_update(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, skip: torch.Tensor):
    """Around scaler.step(optimizer) and scaler.update(), after scaler.unscale_(optimizer): the update is skipped
    when `skip` (a 0-d bool tensor) holds, on the device, by folding it into the found-inf flag the optimizer
    reads. A spike is no overflow: a step skipped for it alone leaves the loss scale and its growth count as they
    were (under float16 each such skip would otherwise halve the scale: 30 skips took 8192 to 2^-16), while
    non-finite gradients still back it off."""
    found_infs = list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())
    overflow = torch.stack(found_infs).amax() > 0  # before the spike is folded in
    scale, growth = scaler._scale.clone(), scaler._growth_tracker.clone()
    for found in found_infs:
        found.copy_(torch.maximum(found, skip.to(found.dtype)))
    yield
    spike_only = skip & ~overflow
    scaler._scale.copy_(torch.where(spike_only, scale, scaler._scale))
    scaler._growth_tracker.copy_(torch.where(spike_only, growth, scaler._growth_tracker))
