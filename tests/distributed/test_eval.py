"""launch/eval.py, launch/compare.py and HellaSwag, against transformers and logged values."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2repro import shards
from gpt2repro.presets import PRESETS
from tests.distributed.helpers import REPO, losses, metrics, run, train_cmd

transformers = pytest.importorskip("transformers")
EVAL = str(REPO / "launch" / "eval.py")
COMPARE = str(REPO / "launch" / "compare.py")


pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier


def one_line_error(proc, fragment):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(path)
    return path, model


def test_eval_of_a_checkpoint_reproduces_its_logged_val_loss(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    run(train_cmd(shakespeare_data, out, "--max_steps", 3, "--eval_interval", 3, "--ckpt_interval", 3))
    logged = [r["val_loss"] for r in metrics(out) if "val_loss" in r][-1]
    proc = run([sys.executable, EVAL, "--ckpt", str(out), "--data", str(shakespeare_data), "--batch-size", "3"])
    result = json.loads((out / "checkpoints" / "step_00000003" / "eval_val.json").read_text())
    assert result["loss"] == pytest.approx(logged, rel=1e-6)
    assert result["num_tokens"] == 512 and "perplexity" in proc.stdout
    # Split across two ranks under torchrun: the same windows, the same mean.
    two = tmp_path / "two_ranks.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", EVAL]
    run([*torchrun, "--ckpt", str(out), "--data", str(shakespeare_data), "--batch-size", "3", "--out", str(two)])
    assert json.loads(two.read_text())["loss"] == pytest.approx(logged, rel=1e-6)


def test_eval_uses_the_runs_own_dtype(shakespeare_data, tmp_path):
    out = tmp_path / "bf16"
    run(
        train_cmd(
            shakespeare_data, out, "--max_steps", 2, "--eval_interval", 2, "--ckpt_interval", 2, "--dtype", "bfloat16"
        )
    )
    logged = [r["val_loss"] for r in metrics(out) if "val_loss" in r][-1]
    evaluate = [sys.executable, EVAL, "--ckpt", str(out), "--data", str(shakespeare_data), "--batch-size", "4"]
    run(evaluate)
    result = json.loads((out / "checkpoints" / "step_00000002" / "eval_val.json").read_text())
    assert result["loss"] == logged  # bf16 autocast, as in training: the same windows, the same numbers
    run([*evaluate, "--dtype", "float32", "--out", str(tmp_path / "fp32.json")])
    assert json.loads((tmp_path / "fp32.json").read_text())["loss"] != logged


def test_hf_loss_equals_transformers_on_the_same_windows(hf_dir, shakespeare_data, tmp_path):
    path, hf = hf_dir
    baselines = tmp_path / "baselines.json"
    cmd = [sys.executable, EVAL, "--hf", str(path), "--data", str(shakespeare_data), "--max-tokens", "1024"]
    run([*cmd, "--baselines", str(baselines), "--out", str(tmp_path / "r.json")])
    got = json.loads((tmp_path / "r.json").read_text())["loss"]
    # Oracle: transformers' own model on the first 1024 val tokens in 64-token windows.
    val = shards.open_tokens(shards.find_shards(shakespeare_data)["val"][0])
    rows = torch.from_numpy(np.stack([val[i * 64 : i * 64 + 65] for i in range(16)]).astype(np.int64))
    with torch.no_grad():
        logits = hf(rows[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
    assert got == pytest.approx(expected.item(), rel=1e-5)
    assert json.loads(baselines.read_text())["tiny-gpt2"]["val_loss"] == pytest.approx(got)


def test_finetune_from_a_hugging_face_directory_starts_at_its_weights(hf_dir, shakespeare_data, tmp_path):
    from gpt2repro.weights import with_source_shape

    path, _ = hf_dir
    out = tmp_path / "ft"
    # A learning rate so small that one step leaves the weights as they were loaded.
    args = [
        "--config",
        "shakespeare-cpu",
        "--init_from",
        str(path),
        "--lr",
        "1e-12",
        "--min_lr",
        "0",
        "--warmup_steps",
        "0",
        "--max_steps",
        "1",
        "--eval_interval",
        "1",
        "--eval_tokens",
        "640",
        "--batch_size",
        "4",
        "--device",
        "cpu",
    ]
    proc = run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--data", str(shakespeare_data), "--out", str(out), *args]
    )
    assert "from scratch" in proc.stdout  # a new run: step 0, fresh optimizer
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["block_size"]) == (2, 32, 64)  # the source's shape
    logged = metrics(out)[-1]["val_loss"]
    hf_eval = tmp_path / "hf.json"
    run(
        [
            sys.executable,
            EVAL,
            "--hf",
            str(path),
            "--data",
            str(shakespeare_data),
            "--max-tokens",
            "640",
            "--out",
            str(hf_eval),
            "--baselines",
            str(tmp_path / "b.json"),
        ]
    )
    assert logged == pytest.approx(json.loads(hf_eval.read_text())["loss"], rel=1e-6)

    base = PRESETS["shakespeare-cpu"].replace(init_from=str(path))
    cropped = with_source_shape(base.replace(block_size=32), frozenset({"block_size"}))
    assert (cropped.block_size, cropped.n_layer) == (32, 2)
    with pytest.raises(ValueError, match=r"drop --n_layer 3 \(the source has 2\)"):
        with_source_shape(base.replace(n_layer=3), frozenset({"n_layer"}))
    with pytest.raises(ValueError, match="it can only crop"):
        with_source_shape(base.replace(block_size=128), frozenset({"block_size"}))


def test_hellaswag_scores_forced_endings(hf_dir, tmp_path):
    from gpt2repro.tokenizer import gpt2

    path, hf = hf_dir
    enc = gpt2()
    rng = np.random.default_rng(0)
    words = ["the king", "a horse", "went home", "and then", "she said", "over the hill", "quickly", "ROMEO:"]
    lines, expected_acc = [], []
    for _ in range(12):
        ctx = " ".join(rng.choice(words, 6))
        endings = [" ".join(rng.choice(words, int(rng.integers(1, 5)))) for _ in range(4)]
        summed, mean = [], []
        for ending in endings:  # oracle: each ending alone through transformers, no batching or padding
            ctx_ids, end_ids = enc.encode_ordinary(ctx), enc.encode_ordinary(" " + ending)
            ids = torch.tensor([ctx_ids + end_ids])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0, :-1], -1)
            token_logp = logp[torch.arange(ids.size(1) - 1), ids[0, 1:]][-len(end_ids) :]
            summed.append(-token_logp.sum().item())
            mean.append(-token_logp.mean().item())
        label = int(np.argmin(mean))  # forced: the ending the model itself prefers per token
        expected_acc.append(int(np.argmin(summed)) == label)
        lines.append(json.dumps({"ctx": ctx, "endings": endings, "label": label}))
    file = tmp_path / "hellaswag.jsonl"
    file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "h.json"
    run([sys.executable, EVAL, "--hf", str(path), "--hellaswag", str(file), "--out", str(out)])
    h = json.loads(out.read_text())["hellaswag"]
    assert h["num_examples"] == 12 and h["acc_norm"] == 1.0
    assert h["acc"] == pytest.approx(sum(expected_acc) / 12)

    file.write_text(lines[0] + '\n{"ctx": "x", "endings": ["a"]}\n')
    proc = run([sys.executable, EVAL, "--hf", str(path), "--hellaswag", str(file)], check=False)
    one_line_error(proc, "line 2 is not a HellaSwag example")


def write_run(path, evals, steps=()):
    path.mkdir()
    records = [{"step": s, "tokens": t, "loss": loss} for s, t, loss in steps]
    records += [{"step": s, "tokens": t, "val_loss": v} for s, t, v in evals]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "tok')


def test_compare_writes_a_plot_and_the_crossing_table(tmp_path):
    write_run(
        tmp_path / "fast",
        [(1, 1000, 3.5), (2, 2000, 3.1), (3, 3000, 3.0)],
        steps=[(1, 1000, 3.6), (2, 2000, 3.2), (3, 3000, 3.05)],
    )
    write_run(tmp_path / "slow", [(1, 1000, 4.0), (2, 2000, 3.6)])
    ran = {"dtype": "bfloat16", "compile": True, "fused_loss": False, "strategy": "fsdp", "world_size": 8}
    (tmp_path / "fast" / "config.json").write_text(json.dumps(ran))  # what a run's config.json records
    png, table = tmp_path / "c.png", tmp_path / "t.csv"
    proc = run(
        [
            sys.executable,
            COMPARE,
            str(tmp_path / "fast"),
            str(tmp_path / "slow"),
            "--baseline",
            "gpt2-124m",
            "gpt2-350m",
            "--out",
            str(png),
            "--csv",
            str(table),
            "--log-x",
        ]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "gpt2-124m reached at 2,000 tokens (gap -0.1200)" in proc.stdout  # 3.1 <= 3.12 first at 2000
    assert "gpt2-350m not reached" in proc.stdout
    assert "ran: dtype bfloat16, compile on, fused_loss off, strategy fsdp, world_size 8" in proc.stdout
    import csv

    rows = list(csv.DictReader(table.open()))
    assert rows[0]["gpt2-124m_reached_at_tokens"] == "2000" and rows[1]["gpt2-124m_reached_at_tokens"] == ""
    assert float(rows[1]["gpt2-124m_gap"]) == pytest.approx(3.6 - 3.12)


def test_bad_inputs(hf_dir, shakespeare_data, tmp_path):
    small = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    )
    small.save_pretrained(tmp_path / "small")
    proc = run([sys.executable, EVAL, "--hf", str(tmp_path / "small"), "--data", str(shakespeare_data)], check=False)
    one_line_error(proc, "does not cover")

    data = tmp_path / "tiny_val"
    data.mkdir()
    shards.write_shard(data / "d_train_000000.bin", np.arange(500))
    shards.write_shard(data / "d_val_000000.bin", np.arange(10))
    proc = run([sys.executable, EVAL, "--hf", str(hf_dir[0]), "--data", str(data)], check=False)
    one_line_error(proc, "fewer than block_size + 1")

    (tmp_path / "no_metrics").mkdir()
    proc = run([sys.executable, COMPARE, str(tmp_path / "no_metrics"), "--out", str(tmp_path / "x.png")], check=False)
    one_line_error(proc, "has no metrics.jsonl")


def test_periodic_hellaswag_during_training(shakespeare_data, tmp_path):
    file = tmp_path / "hs.jsonl"
    examples = [
        {"ctx": f"ROMEO: {w}", "endings": ["good night", "the king", "a horse", "my lord"], "label": i % 4}
        for i, w in enumerate(["O", "Ay", "Nay", "Well"])
    ]
    file.write_text("".join(json.dumps(e) + "\n" for e in examples))
    out = tmp_path / "run"
    run(train_cmd(shakespeare_data, out, "--max_steps", 2, "--eval_interval", 2, "--hellaswag_file", file))
    last = metrics(out)[-1]
    assert last["step"] == 2 and "val_loss" in last and last["hellaswag_acc_norm"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_an_llmc_model_file_evaluates_samples_trains_and_goes_back(shakespeare_data, tmp_path):
    """Both directions through the launchers: a run exported as llm.c's float32 and bfloat16 files, which then
    evaluate, sample, start a run (--init_from) and export to Hugging Face like any other weights."""
    out = tmp_path / "run"
    run(train_cmd(shakespeare_data, out, "--max_steps", 3, "--eval_interval", 3, "--ckpt_interval", 3))
    logged = [r["val_loss"] for r in metrics(out) if "val_loss" in r][-1]
    export = [sys.executable, str(REPO / "launch" / "export.py"), "--ckpt", str(out)]
    fp32, bf16 = tmp_path / "gpt2_tiny.bin", tmp_path / "gpt2_tiny_bf16.bin"
    run([*export, "--llmc", str(fp32)])
    run([*export, "--llmc", str(bf16), "--llmc_dtype", "bfloat16"])
    assert bf16.stat().st_size - 1024 == (fp32.stat().st_size - 1024) // 2

    def evaluated(source: Path) -> float:  # on the run's val windows (an llm.c file does not say how many)
        result = tmp_path / f"{source.name}.json"
        data = ["--data", str(shakespeare_data), "--max-tokens", "512"]
        run([sys.executable, EVAL, "--ckpt", str(source), *data, "--out", str(result)])
        return json.loads(result.read_text())["loss"]

    assert evaluated(fp32) == pytest.approx(logged, rel=1e-6)  # the run's own val loss, from llm.c's file
    assert evaluated(bf16) == pytest.approx(logged, abs=0.02)  # bfloat16 weights: close, not equal
    proc = run([sys.executable, str(REPO / "launch" / "sample.py"), "--ckpt", str(fp32), "--max-new-tokens", "5"])
    assert "--- sample 1 ---" in proc.stdout
    # A run that starts from the file: the source's shape, and at a vanishing lr its weights' val loss.
    ft = tmp_path / "ft"
    args = [
        "--init_from",
        str(fp32),
        "--lr",
        "1e-12",
        "--min_lr",
        "0",
        "--warmup_steps",
        "0",
        "--max_steps",
        "1",
        "--eval_interval",
        "1",
    ]
    proc = run(train_cmd(shakespeare_data, ft, *args))
    assert "from scratch" in proc.stdout and metrics(ft)[-1]["val_loss"] == pytest.approx(logged, rel=1e-5)
    run([*export[:-2], "--ckpt", str(fp32), "--hf", str(tmp_path / "hf")])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.n_embd == 32 and hf.config.vocab_size == 50257
    broken = tmp_path / "broken.bin"
    broken.write_bytes(fp32.read_bytes()[:-4])
    proc = run([sys.executable, EVAL, "--ckpt", str(broken), "--data", str(shakespeare_data)], check=False)
    one_line_error(proc, "it is truncated")


@pytest.fixture(scope="module")
def harness_setup(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from tests import harness_data

    return harness_data.build(tmp_path_factory.mktemp("harness"))


def test_lm_eval_tasks_on_two_ranks_equal_one_through_eval_py_and_lm_evals_own_cli(harness_setup, tmp_path):
    """lm-eval splits the documents across ranks and gathers them on rank 0: launch/eval.py --tasks and
    lm-eval's own command line (python -m gpt2repro.harness) on 2 ranks give 1 rank's scores."""
    hf_dir, _, task_data, task_dir = harness_setup
    tasks = ["lambada_openai", "wikitext", "hellaswag", "next_line"]
    data = ",".join(f"{task}={path}" for task, path in task_data.items())
    args = ["--hf", str(hf_dir), "--tasks", ",".join(tasks), "--task-data", data, "--task-dir", str(task_dir)]
    args += ["--batch-size", "3", "--dtype", "float32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run([sys.executable, EVAL, *args, "--out", str(one), "--baselines", str(tmp_path / "b.json")])
    run([*torchrun, EVAL, *args, "--out", str(two), "--baselines", str(tmp_path / "b.json")])
    expected = json.loads(one.read_text())["tasks"]
    assert set(expected) == set(tasks) and expected["next_line"]["exact_match"] > 0
    got = json.loads(two.read_text())["tasks"]
    for task in tasks:
        assert got[task] == pytest.approx(expected[task], rel=1e-5), task
    # lm-eval's own CLI, with the model registered: the generation task (its YAML in --include_path).
    cli = [*torchrun, "-m", "gpt2repro.harness", "--model", "gpt2repro", "--tasks", "next_line"]
    cli += ["--model_args", f"ckpt={hf_dir},dtype=float32", "--include_path", str(task_dir), "--device", "cpu"]
    cli += ["--output_path", str(tmp_path / "cli")]
    run(cli)
    (written,) = (tmp_path / "cli").rglob("results_*.json")
    cli_score = json.loads(written.read_text())["results"]["next_line"]["exact_match,none"]
    assert cli_score == pytest.approx(expected["next_line"]["exact_match"])


def test_eval_tasks_in_training_log_what_eval_py_gives_for_the_checkpoint_and_change_no_loss(
    shakespeare_data, harness_setup, tmp_path
):
    """--eval_tasks at every evaluation on 2 ranks: each eval record carries TASK/METRIC, the last equals
    launch/eval.py --tasks on the checkpoint of that step (the path tested against HFLM), and the losses
    are bit for bit those of the same run without tasks (lm-eval's seeding leaves training's RNG alone)."""
    _, _, task_data, _ = harness_setup
    lambada = task_data["lambada_openai"]
    common = ["--max_steps", 4, "--eval_interval", 2, "--ckpt_interval", 4, "--dropout", 0.1]
    tasks = [
        "--eval_tasks",
        "lambada_openai",
        "--eval_task_data",
        f"lambada_openai={lambada}",
        "--eval_tasks_at",
        "eval",
    ]
    with_tasks, without = tmp_path / "tasks", tmp_path / "plain"
    proc = run(train_cmd(shakespeare_data, with_tasks, *common, *tasks, nproc=2))
    run(train_cmd(shakespeare_data, without, *common, nproc=2))
    evals = [r for r in metrics(with_tasks) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("lambada_openai/acc" in r for r in evals)
    assert "lambada_openai/perplexity" in proc.stdout  # in the eval's log line too
    assert losses(with_tasks) == losses(without)
    out = tmp_path / "eval.json"
    ckpt = with_tasks / "checkpoints" / "step_00000004"
    data = f"lambada_openai={lambada}"
    run(
        [sys.executable, EVAL, "--ckpt", str(ckpt), "--tasks", "lambada_openai", "--task-data", data, "--out", str(out)]
    )
    offline = json.loads(out.read_text())["tasks"]["lambada_openai"]
    assert evals[-1]["lambada_openai/perplexity"] == pytest.approx(offline["perplexity"], rel=1e-5)
    assert evals[-1]["lambada_openai/acc"] == offline["acc"]
