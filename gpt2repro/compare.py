"""Loss curves of runs against each other, GPT-2 and the references: tables, a verdict and a plot.

Reads RUN_DIR/metrics.jsonl (works while a run is still writing it). Tokens seen is the
x axis, so runs with different batch sizes line up.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from gpt2repro import references, rundir
from gpt2repro.references import Reference


@dataclass
class Run:
    name: str
    steps: list[dict]  # records with a train loss
    evals: list[dict]  # records with a val_loss
    dataset: str | None = None  # the dataset it trained on (references.run_dataset)
    model: str | None = None  # the model it trained (references.run_model)
    settings: dict | None = None  # what ran (its config.json's SETTINGS), None for a run without one
    events: list[dict] = dataclasses.field(default_factory=list)  # the spike guard's rollbacks
    rolled_back: list[dict] = dataclasses.field(default_factory=list)  # the steps they took back, with a loss
    spikes: list[dict] = dataclasses.field(default_factory=list)  # the steps the spike guard skipped (spike_loss)


# What a reader comparing two runs needs to tell them apart: a run's settled values, from its config.json.
SETTINGS = (
    "dtype",
    "compile",
    "fused_loss",
    "strategy",
    "world_size",
    "batch_size",
    "grad_accum_steps",
    "total_batch_tokens",
    "optimizer",
    "lr",
    "activation_checkpointing",
    "fp8",
)


def read_settings(run_dir: str | os.PathLike) -> dict | None:
    recorded = rundir.read_config(run_dir)
    return None if recorded is None else {name: recorded[name] for name in SETTINGS if name in recorded}


def read_run(run_dir: str | os.PathLike) -> Run:
    if not rundir.has_metrics(run_dir):
        raise ValueError(f"{run_dir} has no metrics.jsonl; pass a run directory written by launch/train.py.")
    records = rundir.read_metrics(run_dir)
    steps = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if r.get("val_loss") is not None]
    if not steps and not evals:
        raise ValueError(f"{Path(run_dir) / rundir.METRICS} holds no logged steps yet.")
    events = [r for r in records if "rollback_from" in r]
    return Run(
        Path(run_dir).name,
        steps,
        evals,
        references.run_dataset(run_dir),
        references.run_model(run_dir),
        read_settings(run_dir),
        events,
        [r for r in rundir.read_metrics(run_dir, rundir.ROLLED_BACK) if r.get("loss") is not None],
        [r for r in records if "spike_loss" in r],
    )


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard does."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def table(runs: list[Run], baselines: dict[str, dict], names: list[str]) -> list[dict]:
    """Per run: final and best val loss, and per baseline the tokens at which it was first reached."""
    rows = []
    for run in runs:
        vals = [r["val_loss"] for r in run.evals]
        row = {
            "run": run.name,
            "final_val_loss": vals[-1] if vals else None,
            "best_val_loss": min(vals, default=None),
            "tokens": (run.evals or run.steps)[-1]["tokens"],
            **(run.settings or {}),
        }
        for name in names:
            target = baselines[name]["val_loss"]
            hit = next((r["tokens"] for r in run.evals if r["val_loss"] <= target), None)
            row[f"{name}_reached_at_tokens"] = hit
            row[f"{name}_gap"] = None if not vals else vals[-1] - target
        rows.append(row)
    return rows


def format_table(rows: list[dict], names: list[str]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = []
    for row in rows:
        parts = [
            f"{row['run']}: final val {num(row['final_val_loss'], '.4f')}",
            f"best {num(row['best_val_loss'], '.4f')}",
            f"at {row['tokens']:,} tokens",
        ]
        for name in names:
            hit = row[f"{name}_reached_at_tokens"]
            reached = f"reached at {hit:,} tokens" if hit is not None else "not reached"
            parts.append(f"{name} {reached} (gap {num(row[f'{name}_gap'], '+.4f')})")
        lines.append(" | ".join(parts))
        if any(name in row for name in SETTINGS):  # what ran, from its config.json
            lines.append("    ran: " + ", ".join(f"{name} {_setting(row[name])}" for name in SETTINGS if name in row))
    return "\n".join(lines)


def _setting(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:,}" if isinstance(value, int) else str(value)


def verdicts(run: Run, reference: Reference, target: Reference | None) -> tuple[list[dict], str]:
    """Each eval of the run against the reference curve (references.Comparison's fields), and one sentence:
    the projection to the target, or why there is none."""
    comparison = references.Comparison(reference, run.dataset)
    rows = [
        {
            "run": run.name,
            "step": r["step"],
            "tokens": r["tokens"],
            "val_loss": r["val_loss"],
            **comparison.fields(r["tokens"], r["val_loss"]),
        }
        for r in run.evals
    ]
    if references.datasets_differ(run.dataset, reference):
        return rows, (
            f"{run.name}: trained on {run.dataset}, {reference.name} on {reference.dataset}: the datasets "
            "differ, so there is no verdict or projection"
        )
    if target is None:
        return rows, f"{run.name}: no target loss is known for {run.dataset or 'its dataset'}; pass --target"
    evals = [(r["tokens"], r["val_loss"]) for r in run.evals]
    last_tokens = evals[-1][0] if evals else None
    if why := references.why_no_projection(reference, run.dataset, run.model, last_tokens):
        return rows, f"{run.name}: no projection to {target.name}'s val loss: {why}"
    return rows, f"{run.name}: {references.projection(evals, reference, target).sentence}"


def format_verdicts(rows: list[dict], reference: Reference, last: int = 10) -> str:
    lines = [f"{'step':>8} {'tokens':>15} {'val':>8} {reference.name[:24]:>24} {'gap':>8}  verdict"]
    if len(rows) > last:
        lines.append(f"{'...':>8} ({len(rows) - last} earlier evals)")
    for r in rows[-last:]:
        ref = "-" if r["ref_val_loss"] is None else f"{r['ref_val_loss']:.4f}"
        gap = "-" if r["ref_gap"] is None else f"{r['ref_gap']:+.4f}"
        lines.append(f"{r['step']:>8} {r['tokens']:>15,} {r['val_loss']:>8.4f} {ref:>24} {gap:>8}  {r['verdict']}")
    return "\n".join(lines)


def plot(
    runs: list[Run],
    baselines: dict[str, dict],
    names: list[str],
    out: str,
    log_x: bool,
    smoothing: float,
    refs: list[Reference] = (),
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, run in enumerate(runs):
        color = f"C{i}"
        if run.steps:
            tokens = [r["tokens"] for r in run.steps]
            ax.plot(
                tokens,
                smooth([r["loss"] for r in run.steps], smoothing),
                color=color,
                alpha=0.45,
                lw=1,
                label=f"{run.name} train (smoothed)",
            )
        if run.evals:
            ax.plot(
                [r["tokens"] for r in run.evals],
                [r["val_loss"] for r in run.evals],
                color=color,
                lw=2,
                marker="o",
                ms=3,
                label=f"{run.name} val",
            )
        if run.rolled_back:  # the steps a rollback took back: the spikes it saw, kept as evidence
            ax.plot(
                [r["tokens"] for r in run.rolled_back],
                [r["loss"] for r in run.rolled_back],
                ls="none",
                marker="x",
                ms=4,
                color=color,
                alpha=0.6,
                label=f"{run.name} rolled back",
            )
        if run.spikes:  # the batches the spike guard skipped, marked along the top (their losses lie far above)
            ax.plot(
                [r["tokens"] for r in run.spikes],
                [0.97] * len(run.spikes),
                transform=ax.get_xaxis_transform(),
                ls="none",
                marker="v",
                ms=4,
                color=color,
                alpha=0.6,
                label=f"{run.name} skipped",
            )
        for event in run.events:  # where the spike guard rolled the run back (its tokens at the checkpoint)
            ax.axvline(event["tokens"], color=color, ls=":", lw=1)
            ax.annotate(
                f"rollback from step {event['rollback_from']}",
                (event["tokens"], 0.98),
                color=color,
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                fontsize=7,
            )
    for j, name in enumerate(names):
        row = baselines[name]
        ax.axhline(
            row["val_loss"],
            color="k",
            ls=["--", ":", "-.", (0, (5, 1))][j % 4],
            lw=1,
            label=f"{name} val {row['val_loss']:.3f} ({row.get('source', 'published')})",
        )
    dashes = ["--", ":", "-.", (0, (5, 1))]
    for j, ref in enumerate(refs):
        if ref.is_curve:  # from its first eval after step 0 (step 0 has no place on a log axis)
            ax.plot(
                ref.tokens[1:],
                ref.val_losses[1:],
                color="0.25",
                lw=1.5,
                alpha=0.8,
                label=f"{ref.name} val ({ref.dataset})",
            )
        else:
            ax.axhline(
                ref.val_loss,
                color="0.45",
                ls=dashes[j % 4],
                lw=1,
                label=f"{ref.name} val {ref.val_loss:.3f} ({ref.dataset})",
            )
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    if log_x:
        ax.set_xscale("log")
    finite = [r["val_loss"] for run in runs for r in run.evals] + [r["loss"] for run in runs for r in run.steps]
    finite = [v for v in finite if math.isfinite(v)]
    if finite:  # keep the interesting part: from the baselines up to where the curves have settled
        marks = [baselines[n]["val_loss"] for n in names] + [r.val_loss for r in refs if not r.is_curve]
        low = min(finite + marks + [min(r.val_losses) for r in refs if r.is_curve])
        ax.set_ylim(low - 0.1, min(max(finite), low + 4.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("loss against tokens seen")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
