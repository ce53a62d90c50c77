"""The tune's settings and the forecast: how long a launch takes at a measured pace, with its evaluations and
checkpoints, what it costs, and when it reaches GPT-2's loss at a reference's pace. A leaf: the tune
(gpt2repro/tune.py) and the running log (gpt2repro/metrics.py) both ask it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpt2repro import references
from gpt2repro.schedule import periodic_count
from gpt2repro.schema import Settings, setting


@dataclass(frozen=True)
class TuneSettings(Settings):
    """--tune true (gpt2repro/tune.py): time each layout that may fit for tune_steps steps after tune_warmup, print
    the table, the fastest and the forecast, train nothing."""

    TITLE = "tune"

    tune: bool = setting(
        False, "time the layouts that may fit, print the fastest and the forecast, train nothing", resumable=True
    )
    tune_steps: int = setting(5, "steps timed per layout", resumable=True, at_least=1)
    tune_warmup: int = setting(3, "steps run before the timing starts", resumable=True, at_least=1)
    tune_out: str = setting("", "write the chosen layout there, as a file --config reads", resumable=True)
    gpu_hour_cost: float = setting(
        0.0, "price of one GPU-hour, for the forecast's cost (0: none shown)", resumable=True, at_least=0
    )


@dataclass(frozen=True)
class Forecast:
    cfg: object  # the run's config (a TrainConfig)
    world_size: int
    step_s: float
    startup_s: float  # the process's start to the end of its first step (compilation and warm-up included)
    eval_s: float  # one evaluation
    ckpt_s: float  # one checkpoint
    reference: references.Reference | None = None
    target: references.Reference | None = None
    measured: str = "measured"  # how eval_s and ckpt_s were found
    first_step: int = 1  # this launch's first step (after a resume: the one after the checkpoint's)
    run_dataset: str | None = None  # the run's data (references.dataset_of), for the reference's applicability

    @property
    def compiled(self) -> bool:
        return self.cfg.compile in ("true", True)

    @property
    def steps(self) -> int:
        """The steps this launch runs."""
        return self.cfg.max_steps - self.first_step + 1

    @property
    def evals(self) -> int:
        return self._count(self.cfg.max_steps, self.cfg.eval_interval)

    @property
    def ckpts(self) -> int:
        return self._count(self.cfg.max_steps, self.cfg.ckpt_interval)

    def _count(self, step: int, interval: int) -> int:
        """Of this launch's steps up to `step`, those that evaluate (or checkpoint) every `interval`."""
        done = periodic_count(self.first_step - 1, interval, self.cfg.max_steps) if self.first_step > 1 else 0
        return periodic_count(step, interval, self.cfg.max_steps) - done

    @property
    def total_s(self) -> float:
        return self.seconds_to(self.cfg.max_steps)

    def seconds_to(self, step: int) -> float:
        """Wall-clock from this launch's start until `step` is done, with the evaluations and checkpoints on the
        way (after a resume: from the resumed process's start, never the downtime before it)."""
        cfg = self.cfg
        return (
            self.startup_s
            + (step - self.first_step) * self.step_s
            + self._count(step, cfg.eval_interval) * self.eval_s
            + self._count(step, cfg.ckpt_interval) * self.ckpt_s
        )

    def why_no_target(self) -> str:
        """Why the reference's pace says nothing of this run ("" where it does): references.why_no_projection."""
        if self.reference is None or self.target is None:
            return ""
        model = references.model_name(self.cfg.n_layer, self.cfg.n_head, self.cfg.n_embd)
        return references.why_no_projection(self.reference, self.run_dataset, model)

    def target_step(self) -> int | None:
        """The step at which the run reaches the target's loss if it keeps the reference's pace; None where the
        reference does not apply to the run."""
        if self.reference is None or self.target is None or self.why_no_target():
            return None
        tokens = self.reference.tokens_to_reach(self.target.val_loss)
        if tokens is None:
            return None
        return math.ceil(tokens / tokens_per_step(self.cfg, self.world_size))

    def describe(self) -> str:
        resumed = f" (from step {self.first_step:,})" if self.first_step > 1 else ""
        terms = [f"{self.steps:,} steps{resumed} at {self.step_s:.4f} s"]
        if self.startup_s:
            compiled = " (the compile included: a relaunch into the same --out loads it)" if self.compiled else ""
            terms.append(f"start-up {self.startup_s:.1f} s{compiled}")
        terms += [f"{self.evals} evals x {self.eval_s:.2f} s"] if self.eval_s else []
        terms += [f"{self.ckpts} checkpoints x {self.ckpt_s:.2f} s"] if self.ckpt_s else []
        line = (
            f"forecast for this launch ({self.world_size} rank(s), as measured; never another world size): "
            f"{' + '.join(terms)} ({self.measured}) = {duration(self.total_s)} ({self.total_s:.1f} s)"
        )
        if self.cfg.gpu_hour_cost:
            gpu_hours, price = self.total_s / 3600 * self.world_size, self.cfg.gpu_hour_cost
            line += f", {gpu_hours:.2f} GPU-hours x ${price:g} = ${gpu_hours * price:,.2f}"
        step = self.target_step()
        if why := self.why_no_target():
            line += f"\nno time to {self.target.name}'s val loss at {self.reference.name}'s pace: {why}"
        elif step is not None and step < self.first_step:
            line += f"\nat {self.reference.name}'s pace it reached {self.target.name}'s val loss before this launch"
        elif step is not None and step <= self.cfg.max_steps:
            line += (
                f"\nat {self.reference.name}'s pace it reaches {self.target.name}'s val loss "
                f"{self.target.val_loss:.4f} at step {step:,}, after {duration(self.seconds_to(step))}"
            )
        elif step is not None:
            line += (
                f"\nat {self.reference.name}'s pace it needs {step:,} steps to reach {self.target.name}'s val loss, "
                f"more than max_steps {self.cfg.max_steps:,}"
            )
        return line


def tokens_per_step(cfg, world_size: int) -> int:
    """Tokens one optimizer step trains, all ranks."""
    return cfg.batch_size * cfg.grad_accum_steps * cfg.block_size * world_size


def reference_and_target(reference: str, dataset: str | None):
    """(the curve a run is judged by, GPT-2 124M's val loss on its dataset): from --reference, as the run's
    evals are judged (train.setup); (None, None) without one."""
    if not reference:
        return None, None
    curve = references.get(reference)
    if not curve.is_curve:
        return None, None
    return curve, references.default_target(dataset or curve.dataset)


def duration(seconds: float) -> str:
    """2h05m09s, or 5m09s under an hour."""
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
