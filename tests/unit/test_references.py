"""References, verdicts and projections, on runs built from the reference curve itself; llm.c's recipes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2repro import references as R
from gpt2repro import shards
from gpt2repro.presets import PRESETS
from gpt2repro.schedule import lr_at

REPO = Path(__file__).resolve().parents[2]
LLMC = R.get("llmc-124m-fineweb10B")
GPT2_FINEWEB = R.get("gpt2-124m@fineweb")


def llmc_learning_rate(step: int, l: float, u: int, x: int, q: float) -> float:  # noqa: E741 (llm.c's flag names)
    """llm.c's llmc/schedulers.h (cosine) for its flags -l lr, -u warmup, -x steps, -q final fraction."""
    if step < u:
        return l * (step + 1) / u
    decay = (step - u) / (x - u)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay))
    return l * q + coeff * (l - l * q)


# scripts/run_gpt2_{124M,350M,774M,1558M}.sh: (-b, -d, -l, -q, -u, -x, -c, -v, -n, -e)
LLMC_SCRIPTS = {
    "gpt2-124m-llmc": (64, 524288, 6e-4, 0.0, 700, 18865, 0.1, 250, 5000, (12, 12, 768)),
    "gpt2-350m-llmc": (64, 524288, 3e-4, 0.0, 700, 60000, 0.1, 250, 2000, (24, 16, 1024)),
    "gpt2-774m-llmc": (32, 524288, 2.5e-4, 0.0, 700, 286102, 0.1, 250, 4000, (36, 20, 1280)),
    "gpt2-1558m-llmc": (16, 1048576, 6e-4, 0.1, 700, 32000, 0.1, 250, 2000, (48, 25, 1600)),
}


@pytest.mark.parametrize("preset", LLMC_SCRIPTS)
def test_llmc_presets_are_its_scripts_flag_for_flag(preset):
    b, d, l, q, u, x, c, v, n, shape = LLMC_SCRIPTS[preset]  # noqa: E741
    cfg = PRESETS[preset]
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (*shape, 1024)
    assert (cfg.batch_size, cfg.total_batch_tokens, cfg.max_steps, cfg.weight_decay) == (b, d, x, c)
    assert (cfg.eval_interval, cfg.ckpt_interval, cfg.eval_tokens) == (v, n, 20 * 64 * 1024 * 8)
    assert (cfg.grad_clip, cfg.beta1, cfg.beta2) == (1.0, 0.9, 0.95)  # llm.c's defaults
    for step in range(0, x, 100):  # llm.c's step counts the updates before; ours is 1-based, as logged
        assert lr_at(step + 1, cfg) == pytest.approx(llmc_learning_rate(step, l, u, x, q), rel=1e-9, abs=1e-12), step


def test_the_llmc_curve_interpolates_in_log_tokens():
    t0, t1 = LLMC.tokens[1], LLMC.tokens[2]  # 250 and 500 steps of 524,288 tokens
    v0, v1 = LLMC.val_losses[1], LLMC.val_losses[2]
    assert (t0, v0) == (131_072_000, 6.1710)
    assert LLMC.val_loss_at(t0) == v0 and LLMC.val_loss_at(t1) == v1
    assert LLMC.val_loss_at(math.sqrt(t0 * t1)) == pytest.approx((v0 + v1) / 2)  # halfway in log tokens
    assert LLMC.val_loss_at(t0 / 2) is None and LLMC.val_loss_at(LLMC.tokens[-1] * 2) is None
    assert LLMC.val_losses[-1] == 3.2722 and GPT2_FINEWEB.val_loss == 3.424958


def synthetic_run(offset: float, ratio: float = 1.0, every: int = 500) -> list[tuple[float, float]]:
    """(tokens, val loss) evals of a run that needs `ratio` times llm.c's tokens for each loss, then
    sits `offset` (relative) above it."""
    evals = []
    for step in range(every, 18_000, every):
        tokens = step * 524_288
        if (reference := LLMC.val_loss_at(tokens / ratio)) is not None:
            evals.append((tokens, reference * (1 + offset)))
    return evals


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (-0.03, "ahead"),
        (-0.005, "on track"),
        (0.0, "on track"),
        (0.015, "on track"),
        (0.05, "behind"),
        (0.2, "diverging"),
        (math.nan, "diverging"),
    ],
)
def test_verdicts_of_runs_offset_from_the_reference(offset, expected):
    comparison = R.Comparison(LLMC, "fineweb10B")
    for tokens, val in synthetic_run(offset):
        fields = comparison.fields(tokens, val)
        assert fields["verdict"] == expected, (tokens, val, fields)
        assert fields["ref_val_loss"] == pytest.approx(LLMC.val_loss_at(tokens))
        if math.isfinite(offset):
            assert fields["ref_gap"] == pytest.approx(val - fields["ref_val_loss"])


def test_a_run_on_another_dataset_gets_no_verdict():
    fields = R.Comparison(LLMC, "openwebtext").fields(1_000_000_000, 3.5)
    assert fields == {"ref_val_loss": None, "ref_gap": None, "verdict": "datasets differ"}
    assert R.Comparison(LLMC, None).fields(1_000_000_000, 3.5)["verdict"] != "datasets differ"  # unknown: judged
    with pytest.raises(ValueError, match="single val loss"):
        R.Comparison(GPT2_FINEWEB, "fineweb10B")


@pytest.mark.parametrize("ratio", [1.0, 1.3, 0.8])
def test_projection_recovers_how_many_more_tokens_a_run_needs(ratio):
    llmc_at_target = LLMC.tokens_to_reach(GPT2_FINEWEB.val_loss)
    assert 4.4e9 < llmc_at_target < 4.7e9  # llm.c passed GPT-2 124M's FineWeb val at ~4.5B tokens
    evals = [e for e in synthetic_run(0.0, ratio) if e[0] < 0.6 * ratio * llmc_at_target]  # not reached yet
    p = R.projection(evals, LLMC, GPT2_FINEWEB)
    assert not p.reached and p.ratio == pytest.approx(ratio, rel=1e-3)
    assert p.tokens == pytest.approx(ratio * llmc_at_target, rel=1e-3)
    assert f"keeps needing {ratio:.2f}x" in p.sentence and "last 3 eval(s)" in p.sentence


def test_projection_of_a_run_that_reached_the_target_says_when():
    evals = synthetic_run(0.0)
    p = R.projection(evals, LLMC, GPT2_FINEWEB)
    first = next(t for t, v in evals if v <= GPT2_FINEWEB.val_loss)
    assert p.reached and p.tokens == first and "reached gpt2-124m@fineweb" in p.sentence


def test_the_dataset_of_a_data_directory(tmp_path):
    fineweb = tmp_path / "fw"
    fineweb.mkdir()
    source = {"kind": "hub", "dataset": "HuggingFaceFW/fineweb", "name": "sample-10BT"}
    manifest = {"format_version": shards.MANIFEST_VERSION, "source": source, "splits": {}}
    (fineweb / shards.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert R.dataset_of(fineweb) == "fineweb10B"
    llmc_files = tmp_path / "llmc"  # llm.c's / modded-nanogpt's published shards: no manifest
    llmc_files.mkdir()
    shards.write_shard(llmc_files / "fineweb_val_000000.bin", [1, 2, 3])
    assert R.dataset_of(llmc_files) == "fineweb10B"
    assert R.dataset_of(tmp_path) is None


def write_run(path: Path, evals: list[tuple[float, float]], dataset: str | None) -> Path:
    path.mkdir()
    lines = [{"step": i + 1, "tokens": int(t), "val_loss": v} for i, (t, v) in enumerate(evals)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (path / "config.json").write_text(json.dumps({"data": "/nowhere", "dataset": dataset}))
    return path


def test_compare_prints_verdicts_and_a_projection_and_plots_the_references(tmp_path):
    behind = write_run(tmp_path / "behind", synthetic_run(0.04, 1.1)[:12], "fineweb10B")
    owt = write_run(tmp_path / "owt", synthetic_run(0.0)[:4], "openwebtext")
    png = tmp_path / "v.png"
    cmd = [
        sys.executable,
        str(REPO / "launch" / "compare.py"),
        str(behind),
        str(owt),
        "--reference",
        "llmc-124m-fineweb10B",
        "gpt2-124m@fineweb",
        "gpt2-124m@owt",
        "--log-x",
        "--out",
        str(png),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "behind against llmc-124m-fineweb10B (fineweb10B)" in out and "(2 earlier evals)" in out
    assert out.count("  behind\n") == 10  # its last 10 evals, each 4% above the curve
    assert "projected to reach gpt2-124m@fineweb's val 3.4250 at about" in out
    assert "owt: trained on openwebtext, llmc-124m-fineweb10B on fineweb10B: the datasets differ" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_a_curve_projects_only_a_run_of_its_dataset_model_and_tokens(tmp_path):
    """references.why_no_projection: "" for GPT-2 124M on FineWeb inside llm.c's tokens; otherwise the reason
    (another dataset, another model size, tokens outside the curve, a single val loss)."""
    inside = LLMC.tokens[5]
    assert LLMC.model == "gpt2-124m" and R.model_name(12, 12, 768) == "gpt2-124m"
    assert R.why_no_projection(LLMC, "fineweb10B", "gpt2-124m", inside) == ""
    assert R.why_no_projection(LLMC, None, None, inside) == ""  # unknown data and model: taken to be the same
    shakespeare = R.model_name(4, 4, 32)
    assert "this run's model is a 4-layer, 4-head, 32-wide model" in R.why_no_projection(LLMC, None, shakespeare)
    assert "gpt2-350m" in R.why_no_projection(LLMC, "fineweb10B", R.model_name(24, 16, 1024), inside)
    assert "this run's data is openwebtext" in R.why_no_projection(LLMC, "openwebtext", "gpt2-124m", inside)
    for outside in (LLMC.tokens[1] / 2, LLMC.tokens[-1] * 2):
        assert "outside llmc-124m-fineweb10B's curve" in R.why_no_projection(LLMC, None, "gpt2-124m", outside)
    assert "single val loss" in R.why_no_projection(GPT2_FINEWEB, "fineweb10B", "gpt2-124m", inside)
    # A run directory as the reference: its curve is of the model its config.json records.
    run = write_run(tmp_path / "small", synthetic_run(0.0)[:4], "fineweb10B")
    (run / "config.json").write_text(json.dumps({"dataset": "fineweb10B", "n_layer": 4, "n_head": 4, "n_embd": 32}))
    mine = R.get(str(run))
    assert mine.model == shakespeare
    assert R.why_no_projection(mine, "fineweb10B", shakespeare, mine.tokens[1]) == ""
    assert "a curve of a 4-layer" in R.why_no_projection(mine, "fineweb10B", "gpt2-124m", mine.tokens[1])


def test_compare_projects_no_run_of_another_model_than_the_curves(tmp_path):
    """launch/compare.py applies training's rule (references.why_no_projection): llm.c's curve is GPT-2 124M's, so
    a 2-layer model's evals on its data and tokens get the reason, not a projected token count."""
    small = write_run(tmp_path / "small", synthetic_run(0.04, 1.1)[:12], "fineweb10B")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "n_layer": 2, "n_head": 2, "n_embd": 64}))
    cmd = [sys.executable, str(REPO / "launch" / "compare.py"), str(small), "--reference", "llmc-124m-fineweb10B"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "s.png")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (
        "small: no projection to gpt2-124m@fineweb's val loss: llmc-124m-fineweb10B is a curve of gpt2-124m, "
        "this run's model is a 2-layer, 2-head, 64-wide model" in proc.stdout
    ), proc.stdout
    assert "projected to reach" not in proc.stdout
