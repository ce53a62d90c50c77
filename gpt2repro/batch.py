"""The batch: its settings and the arithmetic that splits a step's tokens over micro-batches, ranks and
accumulation steps: batch_size x grad_accum_steps x world_size x block_size = total_batch_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2repro.schema import Settings, setting


@dataclass(frozen=True)
class BatchSettings(Settings):
    TITLE = "batch"

    batch_size: int = setting(12, "sequences per rank per micro-batch", resumable=True, at_least=1)
    grad_accum_steps: int = setting(
        1,
        "micro-batches per optimizer step (derived from --total_batch_tokens when that is > 0)",
        resumable=True,
        at_least=1,
    )
    total_batch_tokens: int = setting(
        0,
        "tokens per optimizer step, all ranks (0: batch_size x block_size x ranks x grad_accum_steps)",
        resumable=True,
        at_least=0,
    )


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, min(n, at_most) + 1) if n % d == 0]


def resolve_batch(cfg, world_size: int, given: frozenset[str] = frozenset()):
    """Settle batch_size x grad_accum_steps x world_size x block_size = total_batch_tokens.

    Fields in `given` (typed on the command line) are kept as they are; the others, coming
    from a preset or a config file, bend to fit this world size: the micro-batch shrinks to
    one that divides each rank's share, and a preset's total becomes the nearest one the
    ranks can split. A ValueError says what cannot fit and which values would.
    """
    b, t, w = cfg.batch_size, cfg.block_size, world_size
    if min(b, t, w, cfg.grad_accum_steps) < 1 or cfg.total_batch_tokens < 0:
        return cfg  # reported by resolve
    if "grad_accum_steps" in given:
        total = b * t * w * cfg.grad_accum_steps
        if "total_batch_tokens" in given and cfg.total_batch_tokens not in (0, total):
            raise ValueError(
                f"--grad_accum_steps {cfg.grad_accum_steps} and --total_batch_tokens {cfg.total_batch_tokens} "
                f"disagree: {b} x {t} x {w} ranks x {cfg.grad_accum_steps} = {total} tokens; give only one of them"
            )
        return cfg.replace(total_batch_tokens=total)
    if cfg.total_batch_tokens <= 0:
        return cfg.replace(total_batch_tokens=b * t * w * cfg.grad_accum_steps)
    if "total_batch_tokens" in given:  # exactly what was asked, or an error naming what would work
        sequences, rest = divmod(cfg.total_batch_tokens, t * w)
        if rest or sequences == 0:
            nearest = max(1, round(cfg.total_batch_tokens / (t * w))) * t * w
            raise ValueError(
                f"total_batch_tokens {cfg.total_batch_tokens} is not divisible by block_size x world_size = "
                f"{t} x {w} = {t * w}; use a multiple of it, e.g. {nearest}"
            )
        if "batch_size" not in given:
            b = _divisors(sequences, b)[-1]
        elif sequences % b:
            raise ValueError(
                f"total_batch_tokens {cfg.total_batch_tokens} is not divisible by batch_size x block_size x world_size "
                f"= {b} x {t} x {w} = {b * t * w}; batch sizes that divide it: {_divisors(sequences, 4 * b)}"
            )
        return cfg.replace(batch_size=b, grad_accum_steps=sequences // b)
    # A preset's total: exactly, with the largest micro-batch down to half the preset's; else the
    # largest micro-batch whose nearest evenly split global batch is within 10% of it (throughput
    # wants big micro-batches), else the micro-batch that comes closest.
    sequences = cfg.total_batch_tokens / t

    def split(m: int) -> tuple[int, float]:
        accum = max(1, round(sequences / (m * w)))
        return accum, abs(m * w * accum - sequences) / sequences

    options = [b] if "batch_size" in given else range(b, 0, -1)
    exact = next((m for m in options if m >= b / 2 and split(m)[1] == 0), None)
    best = exact or next((m for m in options if split(m)[1] <= 0.1), None) or min(options, key=lambda m: split(m)[1])
    accum = split(best)[0]
    return cfg.replace(batch_size=best, grad_accum_steps=accum, total_batch_tokens=best * t * w * accum)


def describe_batch(asked, cfg, world_size: int, given: frozenset[str] = frozenset()) -> str:
    """One line: the global batch and, where it differs from what was asked, what was derived from what;
    and a warning line of its own when a typed --batch_size moved a preset's step by more than 10%."""
    line = (
        f"batch: {cfg.total_batch_tokens:,} tokens per step = {cfg.batch_size} sequences x {cfg.block_size} tokens "
        f"x {world_size} rank(s) x {cfg.grad_accum_steps} accumulation steps"
    )
    notes = []
    if cfg.batch_size != asked.batch_size:
        notes.append(f"batch_size {asked.batch_size} -> {cfg.batch_size} to split the step evenly")
    if "grad_accum_steps" in given:
        if asked.total_batch_tokens not in (0, cfg.total_batch_tokens):
            notes.append(f"--grad_accum_steps given, so total_batch_tokens {asked.total_batch_tokens:,} is not used")
    elif asked.total_batch_tokens:
        if cfg.total_batch_tokens != asked.total_batch_tokens:
            notes.append(
                f"total_batch_tokens {asked.total_batch_tokens:,} -> {cfg.total_batch_tokens:,}, the "
                f"nearest that {world_size} rank(s) split evenly"
            )
        notes.append("grad_accum_steps derived from total_batch_tokens")
    line += f" ({'; '.join(notes)})" if notes else ""
    asked_total, total = asked.total_batch_tokens, cfg.total_batch_tokens
    typed = "batch_size" in given and not given & {"total_batch_tokens", "grad_accum_steps"}
    if typed and asked_total and abs(total - asked_total) > 0.1 * asked_total:
        line += (
            f"\nwarning: --batch_size {cfg.batch_size} on {world_size} rank(s) makes each step {total:,} tokens, "
            f"{total / asked_total:.2f}x the {asked_total:,} this config asks for; the learning rate and schedule "
            "were tuned for that. Pass a smaller --batch_size, or --total_batch_tokens to change the step on purpose."
        )
    return line
