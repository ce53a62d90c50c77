"""GPT-2's own numbers beside a model's lm-eval results: the paper's Table 3 and OpenAI's checkpoints under
the harness, bundled with their sources (assets/references/gpt2-zero-shot.json, SOURCES.md there).

    table(scores, "gpt2-124m")  -> rows: task, metric, yours, GPT-2 under the harness, verdict, the paper's
    format_table(rows)          -> the side-by-side table as text

A verdict compares with OpenAI's checkpoint under the same harness: measured on this machine when the
baselines file has it (launch/eval.py --hf gpt2 --tasks ...), else a published figure; where there is none,
the paper's figure when it measures the same thing (lambada_openai_last_token). Relative gaps, oriented so
that positive is worse: "ahead" (more than 1% better), "on par" (within 2%, or within two standard errors
of the run's own estimate), "behind" (up to 10% worse), "far behind" (more).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gpt2repro.references import AHEAD, ASSETS, BEHIND, ON_TRACK

MODELS = ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m")
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "bpb", "bpc", "ppl")


@cache
def _data() -> dict:
    return json.loads((ASSETS / "gpt2-zero-shot.json").read_text())


def paper(model: str) -> dict[str, float]:
    """Table 3's column for `model`: {"LAMBADA acc": 0.4599, ...}."""
    data = _data()["paper"]
    column = MODELS.index(check_model(model))
    return {benchmark: values[column] for benchmark, values in data["benchmarks"].items()}


def published(model: str) -> dict[tuple[str, str], tuple[float, str]]:
    """{(task, metric): (value, source)} for OpenAI's checkpoint under lm-eval, as published."""
    return {(r["task"], r["metric"]): (r["value"], r["source"]) for r in _data()["harness"] if r["model"] == model}


def check_model(model: str) -> str:
    if model not in MODELS:
        raise ValueError(f"--vs {model!r}: compare with one of {', '.join(MODELS)}.")
    return model


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def verdict(yours: float, theirs: float, metric: str, stderr: float | None = None) -> str:
    if not math.isfinite(yours):
        return "far behind"
    worse_by = (yours - theirs if lower_is_better(metric) else theirs - yours) / abs(theirs)
    if worse_by < AHEAD:
        return "ahead"
    if worse_by <= ON_TRACK or (stderr and abs(yours - theirs) <= 2 * stderr):
        return "on par"
    return "behind" if worse_by <= BEHIND else "far behind"


@dataclass(frozen=True)
class Row:
    task: str
    metric: str
    yours: float
    gpt2: float | None  # OpenAI's checkpoint under the harness, else the paper's figure if it is the same scoring
    gpt2_source: str
    verdict: str
    paper: float | None  # Table 3's figure for what this metric measures (the same thing, or not: note)
    note: str


def table(
    scores: dict[str, dict[str, float]],
    model: str,
    measured: dict[str, dict[str, float]] | None = None,
    stderrs: dict[str, dict[str, float]] | None = None,
) -> list[Row]:
    """One row per (task, metric) of `scores`, against `model` (a gpt2-SIZE). measured: OpenAI's
    checkpoint's own scores from this machine (launch/eval.py --hf), preferred over the published ones."""
    check_model(model)
    known, column = published(model), paper(model)
    matches = {(m["task"], m["metric"]): m for m in _data()["paper_matches"]}
    rows = []
    for task, metrics in scores.items():
        for metric, yours in metrics.items():
            gpt2, source = known.get((task, metric), (None, ""))
            if measured and metric in measured.get(task, {}):
                gpt2, source = measured[task][metric], "measured here (launch/eval.py --hf)"
            match = matches.get((task, metric))
            on_paper = column[match["benchmark"]] if match else None
            if gpt2 is None and match and match["same"]:  # no harness figure: the paper's, same scoring
                gpt2, source = on_paper, "the paper (same scoring)"
            stderr = (stderrs or {}).get(task, {}).get(metric)
            judged = verdict(yours, gpt2, metric, stderr) if gpt2 is not None else "no reference"
            rows.append(Row(task, metric, yours, gpt2, source, judged, on_paper, match["note"] if match else ""))
    return rows


def format_table(rows: list[Row], model: str) -> str:
    """The table as aligned text, then the sources it cites."""
    header = ("task", "metric", "yours", model, "verdict", "paper", "")
    cells = [header] + [(r.task, r.metric, _num(r.yours), _num(r.gpt2), r.verdict, _num(r.paper), r.note) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in cells]
    sources = sorted({r.gpt2_source for r in rows if r.gpt2_source})
    lines += [f"{model} column: " + "; ".join(sources)] if sources else []
    lines.append(f"paper: {_data()['paper']['source']}")
    return "\n".join(line.rstrip() for line in lines)


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def read_measured(path: str | Path | None, model: str) -> dict[str, dict[str, float]]:
    """OpenAI's checkpoint's task scores from a baselines file (launch/eval.py --hf ... --tasks)."""
    if not path or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text()).get(model, {}).get("tasks", {})
