"""GPT-2's bundled zero-shot figures and the side-by-side table (gpt2repro/zero_shot.py)."""

import json

import pytest

from gpt2repro import zero_shot


def test_every_bundled_figure_has_a_source_and_a_known_model_and_benchmark():
    data = zero_shot._data()
    assert all(len(values) == 4 for values in data["paper"]["benchmarks"].values())
    for row in data["harness"]:
        assert row["model"] in zero_shot.MODELS and row["source"] and row["value"] > 0
    for match in data["paper_matches"]:
        assert match["benchmark"] in data["paper"]["benchmarks"] and match["note"]
    # Table 3 as published: 117M's LAMBADA accuracy 45.99%, 1542M's WikiText-2 perplexity 18.34.
    assert zero_shot.paper("gpt2-124m")["LAMBADA acc"] == 0.4599
    assert zero_shot.paper("gpt2-1558m")["WikiText2 ppl"] == 18.34


@pytest.mark.parametrize(
    ("yours", "theirs", "metric", "stderr", "expected"),
    [
        (0.34, 0.3256, "acc", None, "ahead"),  # 4% better
        (0.32, 0.3256, "acc", None, "on par"),  # 1.7% worse
        (0.30, 0.3256, "acc", 0.013, "on par"),  # 8% worse, but within two of the run's standard errors
        (0.30, 0.3256, "acc", None, "behind"),
        (0.20, 0.3256, "acc", None, "far behind"),
        (38.0, 40.06, "perplexity", None, "ahead"),  # lower is better
        (44.0, 40.06, "perplexity", None, "behind"),
        (float("nan"), 40.06, "perplexity", None, "far behind"),
    ],
)
def test_verdicts_orient_each_metric(yours, theirs, metric, stderr, expected):
    assert zero_shot.verdict(yours, theirs, metric, stderr) == expected


def test_the_table_prefers_a_measured_reference_then_the_published_one_then_the_papers_same_scoring(tmp_path):
    scores = {
        "lambada_openai": {"acc": 0.325, "perplexity": 39.0},
        "lambada_openai_last_token": {"acc": 0.46},
        "arc_easy": {"acc": 0.4},
    }
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps({"gpt2-124m": {"tasks": {"lambada_openai": {"perplexity": 37.0}}}}))
    rows = {
        (r.task, r.metric): r
        for r in zero_shot.table(scores, "gpt2-124m", zero_shot.read_measured(baselines, "gpt2-124m"))
    }
    acc = rows["lambada_openai", "acc"]
    assert (acc.gpt2, acc.verdict, acc.paper) == (0.3256, "on par", 0.4599) and "differs" in acc.note
    ppl = rows["lambada_openai", "perplexity"]
    assert (ppl.gpt2, ppl.gpt2_source, ppl.verdict) == (37.0, "measured here (launch/eval.py --hf)", "behind")
    last = rows["lambada_openai_last_token", "acc"]
    assert (last.gpt2, last.gpt2_source, last.verdict) == (0.4599, "the paper (same scoring)", "on par")
    assert rows["arc_easy", "acc"].verdict == "no reference"
    text = zero_shot.format_table(list(rows.values()), "gpt2-124m")
    assert "lm-evaluation-harness issue #2159" in text and "Table 3" in text
    with pytest.raises(ValueError, match="gpt2-124m"):
        zero_shot.table(scores, "gpt2-small")
