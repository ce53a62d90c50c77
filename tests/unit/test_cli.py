"""The command line as a contract: --help explains every flag, docs/flags.md is that list, every entry point takes
one spelling (and the old dashed one), and a config.json written before the settings moved into their components
still runs as --config and resumes as the same run."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import prepare
from gpt2repro import cli, schema
from gpt2repro import config as C
from gpt2repro.settings import Machine, settle
from gpt2repro.train import check_run_dir

REPO = Path(__file__).resolve().parents[2]
OLD_CONFIG_JSON = Path(__file__).parent / "fixtures" / "config_json_b407c1e.json"  # written by commit b407c1e


def flat(text: str) -> str:
    return " ".join(text.split())


def test_help_shows_every_flag_with_its_type_default_and_meaning_under_its_group():
    out = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    text = flat(out)
    for name, f in C.FIELDS.items():
        assert flat(f"--{name} ") in text
        assert flat(cli.help_line(f)) in text, name  # the meaning, the type or choices, the default
    titles = [title for title, _ in cli.groups()]
    assert [t for t in re.findall(r"^(\S[^:\n]*):$", out, re.M) if t in titles] == titles  # in their order
    section = out.split("\nguard:\n")[1].split("\n\n")[0]
    assert "--spike_zscore" in section and "--rollback_after" in section and "--lr " not in section


def test_every_field_is_declared_once_by_one_component_with_a_meaning():
    declared = [f.name for component in C.COMPONENTS for f in schema.declared(component)]
    assert sorted(declared) == sorted(C.FIELDS) and len(declared) == len(set(declared))
    assert all(len(f.metadata["help"]) > 10 for f in C.FIELDS.values())


def test_the_flag_reference_is_current():
    assert (REPO / "docs" / "flags.md").read_text() == cli.reference(), "run: python -m gpt2repro.cli > docs/flags.md"


def test_one_spelling_for_every_entry_point_and_the_old_dashed_one_still_works(tmp_path):
    for script in (
        "launch/train.py",
        "launch/eval.py",
        "launch/sample.py",
        "launch/export.py",
        "launch/compare.py",
        "data_prep/prepare.py",
    ):
        out = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True).stdout
        assert out and not re.findall(r"--[a-z0-9]+-[a-z0-9-]+", out), script  # underscores only
    _, dashed, given = cli.parse(["--config", "shakespeare-cpu", "--dry-run", "true", "--batch-size", "4"])
    _, spelled, _ = cli.parse(["--config", "shakespeare-cpu", "--dry_run", "true", "--batch_size=4"])
    assert dashed == spelled and dashed.batch_size == 4 and given == {"dry_run", "batch_size"}
    args = prepare.parse_args(["--out", str(tmp_path), "--files", "a.txt", "--num-proc", "3", "--shard-tokens", "99"])
    assert (args.num_proc, args.shard_tokens) == (3, 99)


def test_bad_flags_are_one_error_naming_each_problem():
    with pytest.raises(ValueError) as e:
        cli.parse(["--config", "shakespeare-cpu", "--dry_run", "true", "--lr_shedule", "wsd", "--n_layer", "2.5"])
    assert "did you mean --lr_schedule?" in str(e.value) and "--n_layer takes an integer" in str(e.value)
    _, named, _ = cli.parse(["--config", "shakespeare-cpu", "--dry_run", "true", "--wandb_run_name", "mylr"])
    assert named.wandb_run_name == "mylr"  # a value is never taken for a flag
    with pytest.raises(ValueError, match="--lr needs a value"):  # not: --lr takes a number, got '--max_steps'
        cli.parse(["--config", "shakespeare-cpu", "--dry_run", "true", "--lr", "--max_steps", "5"])
    with pytest.raises(ValueError, match=r"out is not a field but a flag of the command line \(--out\)"):
        C.from_json({"out": "runs/x"}, "config file c.json")
    with pytest.raises(ValueError, match="the GPUs per node must divide the world size"):
        cli.parse(["--config", "gpt2-1558m", "--dry_run", "true", "--world_size", "16", "--gpus_per_node", "3"])
    with pytest.raises(ValueError, match="pass them with --dry_run true"):
        cli.parse(["--config", "shakespeare-cpu", "--data", "d", "--out", "o", "--world_size", "4"])
    bad = ["--max_nonfinite_steps", "0", "--seed", "-1", "--total_batch_tokens", "-100", "--beta1", "1.5"]
    with pytest.raises(ValueError) as e:
        C.resolve(cli.parse(["--config", "shakespeare-cpu", "--dry_run", "true", *bad])[1], 1)
    for problem in (
        "max_nonfinite_steps must be at least 1",
        "seed must be at least 0",
        "total_batch_tokens must be at least 0",
        "beta1 and beta2 must be in [0, 1)",
    ):
        assert problem in str(e.value)


def test_a_config_json_written_before_the_components_runs_and_resumes_as_the_same_run(tmp_path):
    """A run's config.json from commit b407c1e: as --config it settles to exactly what it recorded, and a run
    directory holding it resumes under today's code."""
    recorded = json.loads(OLD_CONFIG_JSON.read_text())
    asked = cli.load_base(str(OLD_CONFIG_JSON))
    cfg = settle(asked, Machine("cpu"))
    settled, defaults = schema.to_json(cfg), schema.to_json(C.TrainConfig())
    assert {name: settled[name] for name in recorded if name in C.FIELDS} == {
        name: value for name, value in recorded.items() if name in C.FIELDS
    }
    added = set(C.FIELDS) - set(recorded)  # fields added since: their defaults
    assert {name: settled[name] for name in added} == {name: defaults[name] for name in added}
    assert set(recorded) - set(C.FIELDS) <= set(C.RUN_KEYS)
    (tmp_path / "config.json").write_text(OLD_CONFIG_JSON.read_text())
    check_run_dir(tmp_path, cfg, Machine("cpu"))  # the same run: resuming is allowed
    with pytest.raises(ValueError, match="holds a different run"):
        check_run_dir(tmp_path, dataclasses.replace(cfg, lr=cfg.lr * 2), Machine("cpu"))
