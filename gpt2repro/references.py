"""How close a run is to GPT-2: published references, a verdict at each eval, a projection.

A reference is a val-loss curve against tokens seen (llm.c's 124M run on FineWeb, or a run
directory of your own) or a single val loss (an OpenAI GPT-2 checkpoint evaluated on a
dataset), always on one dataset. The numbers ship with the package
(gpt2repro/assets/references/, sources in SOURCES.md there).

    verdict: the run's val loss against the reference's at the same token count (interpolated
             in log tokens), as a relative gap: ahead (more than 1% lower), on track (1% lower
             to 2% higher), behind (2% to 10% higher), diverging (more than 10% higher, or not
             finite). Runs on different datasets get "datasets differ" instead.
    projection: when the run reaches a target loss, assuming it keeps needing the same multiple
             of the reference's tokens for the same loss as over its last evals; only where the
             curve applies (why_no_projection): the run's dataset, the model size the curve is of,
             a token count inside the curve.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gpt2repro import rundir, shards
from gpt2repro.corpora import dataset_name
from gpt2repro.model import PRESETS as MODEL_PRESETS

# Published GPT-2 numbers. Losses: OpenAI's checkpoints evaluated on OpenWebText, from
# nanoGPT's README (github.com/karpathy/nanoGPT, "baselines"). HellaSwag acc_norm
# (completion style, 10,042 validation examples) from llm.c's GPT-2 reproductions.
PUBLISHED_BASELINES = {
    "gpt2-124m": {"hf": "gpt2", "params": 124e6, "train_loss": 3.11, "val_loss": 3.12, "hellaswag": 0.2955},
    "gpt2-350m": {"hf": "gpt2-medium", "params": 350e6, "train_loss": 2.85, "val_loss": 2.84, "hellaswag": None},
    "gpt2-774m": {"hf": "gpt2-large", "params": 774e6, "train_loss": 2.66, "val_loss": 2.67, "hellaswag": None},
    "gpt2-1558m": {"hf": "gpt2-xl", "params": 1558e6, "train_loss": 2.56, "val_loss": 2.54, "hellaswag": 0.4893},
}
HF_TO_BASELINE = {v["hf"]: k for k, v in PUBLISHED_BASELINES.items()}


def load_baselines(path: str | os.PathLike | None) -> dict[str, dict]:
    """Published baselines, overridden by live numbers a user measured (launch/eval.py --hf)."""
    table = {name: dict(row, source="published") for name, row in PUBLISHED_BASELINES.items()}
    if path and Path(path).is_file():
        for name, row in json.loads(Path(path).read_text()).items():
            table.setdefault(name, {}).update({k: v for k, v in row.items() if v is not None}, source="measured")
    return table


ASSETS = Path(__file__).parent / "assets" / "references"
AHEAD, ON_TRACK, BEHIND = -0.01, 0.02, 0.10  # relative gaps (run / reference - 1) that bound the verdicts
DIFFERENT_DATASETS = "datasets differ"
LLMC = "github.com/karpathy/llm.c, scripts/run_gpt2_124M.sh; log: github.com/KellerJordan/modded-nanogpt records/track_1_short/2024-10-13_llmc/main.log"  # noqa: E501
VISLOG = "llm.c dev/vislog.ipynb (OpenAI's checkpoints on FineWeb val)"
NANOGPT = "nanoGPT README, baselines (OpenAI's checkpoints on OpenWebText val)"


@dataclass(frozen=True)
class Reference:
    name: str
    dataset: str | None  # None: unknown (a run on local files without a dataset name)
    source: str
    tokens: tuple[float, ...] = ()  # a curve: val loss at these token counts, increasing
    val_losses: tuple[float, ...] = ()
    val_loss: float | None = None  # a single point: a checkpoint's val loss (a horizontal line)
    model: str | None = None  # the model it is of (model_name: gpt2-124m, or a shape); None: unknown

    @property
    def is_curve(self) -> bool:
        return bool(self.tokens)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.dataset or 'dataset unknown'})"

    def val_loss_at(self, tokens: float) -> float | None:
        """The curve's val loss at `tokens`, interpolated linearly in log tokens between its points
        (None before its first point after 0 and past its last); a checkpoint's val loss anywhere."""
        if not self.is_curve:
            return self.val_loss
        points = [(t, v) for t, v in zip(self.tokens, self.val_losses, strict=True) if t > 0]
        if not points or not points[0][0] <= tokens <= points[-1][0]:
            return None
        for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
            if t0 <= tokens <= t1:
                frac = 0.0 if t1 == t0 else (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
                return v0 + frac * (v1 - v0)
        return points[-1][1]  # a curve of one point, at exactly its token count

    def tokens_to_reach(self, loss: float) -> float | None:
        """The first token count at which the curve reaches `loss` (interpolated in log tokens), or None."""
        points = [(t, v) for t, v in zip(self.tokens, self.val_losses, strict=True) if t > 0]
        if not points or loss > points[0][1]:
            return None
        for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
            if v1 <= loss:
                frac = 0.0 if v0 == v1 else (v0 - loss) / (v0 - v1)
                return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
        return None


# The GPT-2 checkpoints' references are named gpt2-SIZE@SHORT for these datasets.
SHORT_NAMES = {"fineweb10B": "fineweb", "openwebtext": "owt"}


def _gpt2(size: str, dataset: str, val_loss: float, source: str) -> Reference:
    return Reference(f"gpt2-{size}@{SHORT_NAMES[dataset]}", dataset, source, val_loss=val_loss, model=f"gpt2-{size}")


def model_name(n_layer: int, n_head: int, n_embd: int) -> str:
    """The GPT-2 size of this shape (gpt2-124m, ...), else the shape itself."""
    for name, c in MODEL_PRESETS.items():
        if name.startswith("gpt2-") and (c.n_layer, c.n_head, c.n_embd) == (n_layer, n_head, n_embd):
            return name
    return f"a {n_layer}-layer, {n_head}-head, {n_embd}-wide model"


@cache
def registry() -> dict[str, Reference]:
    with open(ASSETS / "llmc-gpt2-124m-fineweb10B-val.csv") as f:
        rows = list(csv.DictReader(f))
    llmc = Reference(
        "llmc-124m-fineweb10B",
        "fineweb10B",
        LLMC,
        tuple(float(r["tokens"]) for r in rows),
        tuple(float(r["val_loss"]) for r in rows),
        model="gpt2-124m",
    )
    fineweb = {"124m": 3.424958, "350m": 3.083089, "774m": 3.000580, "1558m": 2.831273}
    owt = {name.removeprefix("gpt2-"): row["val_loss"] for name, row in PUBLISHED_BASELINES.items()}
    refs = [llmc]
    refs += [_gpt2(size, "fineweb10B", loss, VISLOG) for size, loss in fineweb.items()]
    refs += [_gpt2(size, "openwebtext", loss, NANOGPT) for size, loss in owt.items()]
    return {r.name: r for r in refs}


def get(name_or_run: str) -> Reference:
    """A registered reference by name, or the val curve of a run directory (its metrics.jsonl)."""
    if name_or_run in registry():
        return registry()[name_or_run]
    if rundir.has_metrics(name_or_run):
        return from_run(name_or_run)
    raise ValueError(
        f"unknown reference {name_or_run!r}: pass one of {', '.join(registry())}, or a run directory (its val curve)."
    )


def from_run(run_dir: str | os.PathLike) -> Reference:
    evals = {r["tokens"]: r["val_loss"] for r in rundir.read_metrics(run_dir) if r.get("val_loss") is not None}
    if not evals:
        raise ValueError(f"reference run {run_dir} has no val_loss in its metrics.jsonl yet.")
    tokens = sorted(evals)
    return Reference(
        str(run_dir),
        run_dataset(run_dir),
        f"run {run_dir}",
        tuple(tokens),
        tuple(evals[t] for t in tokens),
        model=run_model(run_dir),
    )


def run_model(run_dir: str | os.PathLike) -> str | None:
    """The model a run trained (model_name), as its config.json recorded it; None if unknown."""
    config = rundir.read_config(run_dir) or {}
    shape = [config.get(k) for k in ("n_layer", "n_head", "n_embd")]
    return model_name(*shape) if all(isinstance(v, int) for v in shape) else None


def run_dataset(run_dir: str | os.PathLike) -> str | None:
    """The dataset a run trained on: as its config.json recorded it, else from its data directory."""
    config = rundir.read_config(run_dir)
    if config is None:
        return None
    if "dataset" in config:
        return config["dataset"]
    return dataset_of(config["data"]) if config.get("data") else None


def dataset_of(data_dir: str | os.PathLike) -> str | None:
    """The name of the dataset in data_dir: from its manifest (data_prep/prepare.py), else from llm.c's
    shard names (fineweb_*.bin, edu_fineweb_*.bin: its 10B samples, as published); None if unknown."""
    data_dir = Path(data_dir)
    manifest = shards.read_manifest(data_dir) if data_dir.is_dir() else None
    if manifest is not None:
        source = manifest.get("source", {})
        if source.get("kind") == "hub":
            return dataset_name(source.get("dataset"), source.get("name"))
        return source.get("dataset")
    names = [p.name for p in data_dir.glob("*.bin")] if data_dir.is_dir() else []
    if any(n.startswith("edu_fineweb_") for n in names):
        return "fineweb-edu10B"
    if any(n.startswith("fineweb_") for n in names):
        return "fineweb10B"
    return None


def datasets_differ(run_dataset: str | None, reference: Reference) -> bool:
    """Known to differ; an unknown dataset on either side is taken to be the same (README says so)."""
    return run_dataset is not None and reference.dataset is not None and run_dataset != reference.dataset


def why_no_projection(
    reference: Reference, run_dataset: str | None, run_model: str | None, tokens: float | None = None
) -> str:
    """Why `reference` cannot project a run to a target loss ("" where it can): a projection follows the
    curve, so it holds only for a run on the curve's dataset (an unknown one taken to be the same, as for
    verdicts), of the model the curve is of (unknown: taken to be the same), at `tokens` inside the curve."""
    if not reference.is_curve:
        return f"{reference.name} is a single val loss, not a curve"
    if datasets_differ(run_dataset, reference):
        return f"{reference.name} is a curve on {reference.dataset}, this run's data is {run_dataset}"
    if reference.model is not None and run_model is not None and run_model != reference.model:
        return f"{reference.name} is a curve of {reference.model}, this run's model is {run_model}"
    if tokens is not None and reference.val_loss_at(tokens) is None:
        return f"{_tokens(tokens)} tokens lie outside {reference.name}'s curve"
    return ""


def verdict(val_loss: float, reference_loss: float) -> str:
    gap = val_loss / reference_loss - 1 if math.isfinite(val_loss) else math.inf
    if gap < AHEAD:
        return "ahead"
    if gap <= ON_TRACK:
        return "on track"
    if gap <= BEHIND:
        return "behind"
    return "diverging"


class Comparison:
    """A run's evals against one reference curve: the fields each eval record gets."""

    def __init__(self, reference: Reference, run_dataset: str | None):
        if not reference.is_curve:
            raise ValueError(
                f"--reference {reference.name} is a single val loss, not a curve to follow; pass "
                f"{', '.join(n for n, r in registry().items() if r.is_curve)} or a run directory."
            )
        self.reference, self.run_dataset = reference, run_dataset
        self.short = reference.name if reference.name in registry() else Path(reference.name).name

    def describe(self) -> str:
        line = f"evals are judged against {self.reference.label}, from {self.reference.source}"
        if datasets_differ(self.run_dataset, self.reference):
            line += f"; this run's data is {self.run_dataset}: the datasets differ, so there is no verdict"
        return line

    def fields(self, tokens: int, val_loss: float) -> dict:
        """ref_val_loss, ref_gap (val_loss - ref_val_loss) and verdict at `tokens`."""
        if datasets_differ(self.run_dataset, self.reference):
            return {"ref_val_loss": None, "ref_gap": None, "verdict": DIFFERENT_DATASETS}
        ref = self.reference.val_loss_at(tokens)
        if ref is None:
            return {"ref_val_loss": None, "ref_gap": None, "verdict": "outside the reference's tokens"}
        return {"ref_val_loss": ref, "ref_gap": val_loss - ref, "verdict": verdict(val_loss, ref)}


@dataclass(frozen=True)
class Projection:
    target: Reference
    tokens: float | None  # when the run reaches target.val_loss (projected, or already)
    reached: bool  # already reached, at `tokens`
    ratio: float | None  # the run's tokens per reference token for the same loss, over its last evals
    reference_tokens: float | None  # when the reference reached the target
    evals_used: int
    sentence: str


def projection(evals: list[tuple[float, float]], reference: Reference, target: Reference, last: int = 3) -> Projection:
    """When a run (its (tokens, val loss) evals, in order) reaches target.val_loss.

    Assumption (stated in the sentence): for the same loss, the run keeps needing the same multiple
    of the reference's tokens as it did over its last `last` evals (the median ratio), and the
    reference's curve keeps its shape.
    """
    goal = target.val_loss
    hit = next((t for t, v in evals if v <= goal), None)
    ref_tokens = reference.tokens_to_reach(goal)
    if hit is not None:
        return Projection(
            target, hit, True, None, ref_tokens, 0, f"reached {target.name}'s val {goal:.4f} at {_tokens(hit)} tokens"
        )
    ratios = []
    for t, v in [(t, v) for t, v in evals if t > 0 and math.isfinite(v)][-last:]:
        at = reference.tokens_to_reach(v)
        if at is not None:
            ratios.append(t / at)
    if not ratios:
        return Projection(
            target,
            None,
            False,
            None,
            ref_tokens,
            0,
            f"no projection to {target.name}'s val {goal:.4f}: the run's recent losses lie outside "
            f"{reference.name}'s curve",
        )
    if ref_tokens is None:
        return Projection(
            target,
            None,
            False,
            statistics.median(ratios),
            None,
            len(ratios),
            f"no projection: {reference.name} never reaches {target.name}'s val {goal:.4f}",
        )
    ratio = statistics.median(ratios)
    projected = ratio * ref_tokens
    sentence = (
        f"projected to reach {target.name}'s val {goal:.4f} at about {_tokens(projected)} tokens "
        f"({reference.name} reached it at {_tokens(ref_tokens)}); assumes the run keeps needing {ratio:.2f}x "
        f"{reference.name}'s tokens for the same loss, as over its last {len(ratios)} eval(s)"
    )
    return Projection(target, projected, False, ratio, ref_tokens, len(ratios), sentence)


def _tokens(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def default_target(dataset: str | None) -> Reference | None:
    """GPT-2 124M's val loss on the run's dataset, where it is known."""
    return registry().get(f"gpt2-124m@{SHORT_NAMES.get(dataset)}")
