"""The learning rate schedule: its settings and lr_at, the rate of every optimizer step (a pure function of it).

warmup_steps of linear warmup, then `lr_schedule`: cosine down to min_lr at max_steps (nanoGPT's), constant, or
wsd (warmup-stable-decay: constant, then a linear decay to min_lr over the last decay_steps). A new schedule is
one more choice here and one more branch in lr_at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpt2repro.schema import Settings, setting


@dataclass(frozen=True)
class ScheduleSettings(Settings):
    TITLE = "optimizer and schedule"

    max_steps: int = setting(600_000, "optimizer steps the run trains", resumable=True, at_least=1)
    lr: float = setting(6e-4, "peak learning rate (AdamW's; --muon_lr is the Muon matrices')")
    min_lr: float = setting(6e-5, "the rate the schedule ends at")
    warmup_steps: int = setting(2000, "steps of linear warmup from 0 to lr", at_least=0)
    lr_schedule: str = setting("cosine", "after the warmup", choices=("cosine", "constant", "wsd"))
    decay_steps: int = setting(
        0, "wsd: length of the final linear decay (0: 20% of max_steps)", auto=True, resumable=True, at_least=0
    )

    def problems(self) -> list[str]:
        problems = []
        if not math.isfinite(self.lr) or not math.isfinite(self.min_lr):
            problems.append(f"lr and min_lr must be finite, got lr={self.lr}, min_lr={self.min_lr}")
        elif not 0 <= self.min_lr <= self.lr:
            problems.append(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.lr_schedule == "wsd" and self.decay_steps > self.max_steps:
            problems.append(f"decay_steps ({self.decay_steps}) must be at most max_steps ({self.max_steps})")
        return problems

    def settled(self, machine) -> dict:
        """wsd's decay, when asked as auto: the last 20% of the run (it follows a new --max_steps)."""
        if self.lr_schedule == "wsd" and not self.decay_steps:
            return {"decay_steps": max(1, self.max_steps // 5)}
        return {}


def lr_at(step: int, cfg: ScheduleSettings) -> float:
    """Learning rate of optimizer step `step` (1-based, as logged and checkpointed): a pure function of it."""
    done = step - 1  # updates before this one
    if done < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay = cfg.decay_steps or max(1, cfg.max_steps // 5)
        decay_start = cfg.max_steps - decay
        if done < decay_start:
            return cfg.lr
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, (done - decay_start) / decay)
    progress = min(1.0, (done - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def periodic(step: int, interval: int, last_step: int) -> bool:
    """Whether a periodic event (a log record, an evaluation, a checkpoint) falls on `step`: every `interval`
    steps, and the run's last step."""
    return step % interval == 0 or step == last_step


def periodic_count(step: int, interval: int, last_step: int | None = None) -> int:
    """How many of steps 1..step a periodic event falls on (periodic)."""
    last = last_step if last_step is not None else step
    return step // interval + (1 if step == last and last % interval else 0)
