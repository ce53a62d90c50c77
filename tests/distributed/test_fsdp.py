"""FSDP2, sharded (DCP) checkpoints and export, with real torchrun + gloo processes.

The oracle is a single process (no sharding, no communication) training the same global
batch with more accumulation: the data order is world-size invariant, so every step sees
the same tokens and the losses must agree to float rounding.
"""

import importlib.util
import json
import math
import shutil
import sys

import pytest
import torch

from tests.distributed.helpers import REPO, after_import, env_with_sitecustomize, losses, metrics, run, train_cmd

EXPORT = str(REPO / "launch" / "export.py")
EVAL = str(REPO / "launch" / "eval.py")
# 17 eval windows of 32 tokens: 9 on rank 0, 8 on rank 1, so FSDP's eval must pad its forwards.
STEPS = ["--max_steps", 6, "--eval_interval", 3, "--ckpt_interval", 3, "--eval_tokens", 544]


pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier


def assert_same_run(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "val_loss"):
            if key in ra or key in rb:
                assert math.isclose(ra[key], rb[key], rel_tol=rel), (key, ra, rb)
        # Looser for the norm: the attention key biases get pure rounding noise as gradient (softmax
        # ignores them), and AdamW normalises that noise into full-size updates, so summation order
        # moves those few parameters by ~1e-4 relative within steps; the loss does not notice.
        assert math.isclose(ra["grad_norm"], rb["grad_norm"], rel_tol=max(rel, 1e-3)), (ra, rb)


@pytest.fixture(scope="module")
def oracle(shakespeare_data, tmp_path_factory):
    """One process, micro-batch 4, accumulation 4: 16 sequences per step."""
    out = tmp_path_factory.mktemp("oracle") / "run"
    run(train_cmd(shakespeare_data, out, *STEPS, "--grad_accum_steps", 4))
    return metrics(out)


@pytest.fixture(scope="module")
def fsdp_run(shakespeare_data, tmp_path_factory):
    """Two ranks, FSDP, micro-batch 4, accumulation 2 (gradients reduce-scattered once per step)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    proc = run(train_cmd(shakespeare_data, out, *STEPS, "--grad_accum_steps", 2, "--strategy", "fsdp", nproc=2))
    assert "fsdp on 2 rank(s)" in proc.stdout
    return out


def test_fsdp_equals_single_process(oracle, fsdp_run):
    # Gradient clipping is active (grad_clip 1.0, early norms above it): the norm over shards must be global.
    assert max(r["grad_norm"] for r in oracle) > 1.0
    assert_same_run(oracle, metrics(fsdp_run))
    meta = json.loads((fsdp_run / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["config"]["strategy"] == "fsdp" and meta["world_size"] == 2
    written = [name for name in meta["files"] if name.startswith("state/__")]
    assert len(written) == 2, written  # each rank wrote its own shard file


def resumable_copy(fsdp_run, out):
    """The FSDP run as it was after its step-3 checkpoint (metrics past it are dropped on resume)."""
    shutil.copytree(fsdp_run, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    return out


def test_fsdp_resume_continues_exactly(fsdp_run, shakespeare_data, tmp_path):
    out = resumable_copy(fsdp_run, tmp_path / "resumed")
    resumed = run(train_cmd(shakespeare_data, out, *STEPS, "--grad_accum_steps", 2, "--strategy", "fsdp", nproc=2))
    assert "resumed from" in resumed.stdout and "step_00000003" in resumed.stdout
    assert_same_run(metrics(fsdp_run), metrics(out), rel=1e-6)


def test_two_rank_sharded_checkpoint_resumes_on_one_rank(fsdp_run, oracle, shakespeare_data, tmp_path):
    out = resumable_copy(fsdp_run, tmp_path / "one_rank")  # step 3, written by 2 FSDP ranks
    # One process, no sharding, and activation checkpointing switched on: the same steps 4-6.
    resumed = run(
        train_cmd(shakespeare_data, out, *STEPS, "--grad_accum_steps", 4, "--activation_checkpointing", "true")
    )
    assert "ddp on 1 rank(s)" in resumed.stdout and "step_00000003" in resumed.stdout
    assert_same_run(oracle, metrics(out))


def test_bfloat16_fsdp_tracks_float32(fsdp_run, shakespeare_data, tmp_path):
    out = tmp_path / "bf16"
    run(
        train_cmd(
            shakespeare_data,
            out,
            "--max_steps",
            2,
            "--grad_accum_steps",
            2,
            "--strategy",
            "fsdp",
            "--dtype",
            "bfloat16",
            nproc=2,
        )
    )
    fp32 = losses(fsdp_run)
    for step, loss in losses(out).items():  # 16-bit compute, fp32 master weights and reductions
        assert math.isfinite(loss) and loss == pytest.approx(fp32[step], rel=2e-2)


def test_export_of_a_sharded_checkpoint(fsdp_run, shakespeare_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    single, hf_dir = tmp_path / "model.pt", tmp_path / "hf"
    proc = run([sys.executable, EXPORT, "--ckpt", str(fsdp_run), "--pt", str(single), "--hf", str(hf_dir)])
    assert "written by 2 rank(s) (fsdp)" in proc.stdout

    # The single file evaluates to the val_loss the 2-rank FSDP run logged at that step.
    logged = [r["val_loss"] for r in metrics(fsdp_run) if "val_loss" in r][-1]
    run([sys.executable, EVAL, "--ckpt", str(single), "--data", str(shakespeare_data), "--max-tokens", "544"])
    result = json.loads((tmp_path / "model.eval_val.json").read_text())
    assert result["loss"] == pytest.approx(logged, rel=1e-5)

    # transformers' own GPT-2 loads the exported directory and computes the same logits.
    blob = torch.load(single, weights_only=True)
    from gpt2repro.model import GPT, GPTConfig

    ours = GPT(GPTConfig(**blob["config"])).eval()
    ours.load_state_dict(blob["model"])
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)


def test_fsdp_memory_estimate_within_20_percent_of_measured():
    worker = str(REPO / "tests" / "distributed" / "fsdp_memory_worker.py")
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker])
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        assert abs(r["estimate"] - r["measured"]) <= 0.2 * r["measured"], r


def test_fsdp_builds_on_the_meta_device_with_the_plain_init():
    worker = str(REPO / "tests" / "distributed" / "meta_init_worker.py")
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker])
    assert "meta init equals the plain init" in proc.stdout
    if importlib.util.find_spec("torchao") is not None:
        assert "fp8 meta init equals the plain init" in proc.stdout
    assert "no FSDP model outlives the teardown" in proc.stdout


# Each rank logs, in order, its Newton-Schulz calls and the owners of the broadcasts it joins.
LOG_ORTHOGONALISATION = after_import(
    "gpt2repro.optim",
    """import os
def _log(event):
    with open(os.path.join(os.environ["MUON_LOG_DIR"], "rank" + os.environ.get("RANK", "0")), "a") as f:
        f.write(event + "\\n")
_newton_schulz, _broadcast = module.newton_schulz, module.dist.broadcast
def newton_schulz(*args, **kwargs):
    _log("ns")
    return _newton_schulz(*args, **kwargs)
def broadcast(tensor, *args, group_src=None, **kwargs):
    _log(f"broadcast from {group_src}")
    return _broadcast(tensor, *args, group_src=group_src, **kwargs)
module.newton_schulz, module.dist.broadcast = newton_schulz, broadcast
""",
)


def test_muon_under_fsdp_equals_muon_on_one_process_and_its_checkpoint_reshards(shakespeare_data, tmp_path):
    muon = ["--optimizer", "muon", "--muon_lr", "0.02"]
    oracle = tmp_path / "oracle"
    run(train_cmd(shakespeare_data, oracle, *STEPS, *muon, "--grad_accum_steps", 4))
    sharded = tmp_path / "fsdp"  # each matrix gathered, orthogonalised by its owner rank, scattered back
    logs = tmp_path / "muon_logs"
    logs.mkdir()
    logged = {**env_with_sitecustomize(tmp_path / "log", LOG_ORTHOGONALISATION), "MUON_LOG_DIR": str(logs)}
    cmd = train_cmd(shakespeare_data, sharded, *STEPS, *muon, "--grad_accum_steps", 2, "--strategy", "fsdp", nproc=2)
    run(cmd, environ=logged)
    assert_same_run(metrics(oracle), metrics(sharded))
    # 2 layers x 4 matrices = 4 rounds of 2 per step: in each, a rank orthogonalises its own matrix before it
    # waits on any broadcast, so the two ranks' Newton-Schulz run at once, not one after the other.
    round_ = ["ns", "broadcast from 0", "broadcast from 1"]
    for rank in (0, 1):
        assert (logs / f"rank{rank}").read_text().split("\n")[:-1] == round_ * 4 * 6, rank
    assert metrics(oracle)[-1]["loss"] < metrics(oracle)[0]["loss"] - 0.5  # it trains
    out = resumable_copy(sharded, tmp_path / "one_rank")  # the 2-rank Muon state of step 3, on one process
    run(train_cmd(shakespeare_data, out, *STEPS, *muon, "--grad_accum_steps", 4))
    assert_same_run(metrics(oracle), metrics(out))
