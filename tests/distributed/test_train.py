"""launch/train.py end to end with real processes: torchrun, gloo, kill -9, resume."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.distributed.helpers import (
    REPO,
    TINY,
    TRAIN,
    env,
    env_with_sitecustomize,
    free_port,
    losses,
    metrics,
    run,
    slowed,
    train_cmd,
    wait_for,
)

# Imported first by every Python process started with it on PYTHONPATH: logs which rank opens source.pt.
AUDIT_OPENS = """import os, sys
def _audit(event, args):
    if event == "open" and str(args[0]).endswith("source.pt"):
        with open(os.environ["OPENS_LOG"], "a") as f:
            f.write(os.environ.get("RANK", "no rank") + "\\n")
sys.addaudithook(_audit)
"""


@pytest.fixture(scope="module")
def reference(shakespeare_data, tmp_path_factory):
    """One rank, accumulation 2: the oracle for the multi-rank runs."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(train_cmd(shakespeare_data, out, "--max_steps", 4, "--grad_accum_steps", 2))
    return out


def assert_close_losses(a: dict, b: dict, rel: float = 1e-5):
    assert a.keys() == b.keys() and len(a) >= 4
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=rel), (step, a[step], b[step])


@pytest.mark.slow
def test_a_runs_config_json_as_config_runs_the_same_run(reference, shakespeare_data, tmp_path):
    """The contract: RUN/config.json holds what ran (settled, typed), and passed back as --config it is that run."""
    recorded = json.loads((reference / "config.json").read_text())
    assert (recorded["dtype"], recorded["compile"], recorded["fused_loss"], recorded["strategy"]) == (
        "float32",
        False,
        True,
        "ddp",
    )  # what ran on this CPU, not "auto"
    assert recorded["requested"]["dtype"] == "auto" and recorded["requested"]["fused_loss"] == "auto"
    again = tmp_path / "again"
    run(
        [
            sys.executable,
            TRAIN,
            "--config",
            str(reference / "config.json"),
            "--data",
            str(shakespeare_data),
            "--out",
            str(again),
        ]
    )
    assert losses(again) == losses(reference)  # bitwise: the same run
    rerecorded = json.loads((again / "config.json").read_text())
    assert {k: v for k, v in rerecorded.items() if k != "requested"} == {
        k: v for k, v in recorded.items() if k != "requested"
    }


@pytest.fixture(scope="module")
def two_ranks(shakespeare_data, tmp_path_factory):
    """Two ranks, no accumulation, the fused loss (the default); (run dir, torchrun's result)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, run(train_cmd(shakespeare_data, out, "--max_steps", 4, "--grad_accum_steps", 1, nproc=2))


def test_two_ranks_equal_one_rank_with_accumulation(reference, two_ranks):
    out, proc = two_ranks
    assert proc.stderr == "", proc.stderr[-3000:]  # a clean run (eval, checkpoint, teardown) warns about nothing
    assert_close_losses(losses(reference), losses(out))
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    ref_norms = [r["grad_norm"] for r in metrics(reference)]
    assert [r["grad_norm"] for r in metrics(out)] == pytest.approx(ref_norms, rel=1e-5)


@pytest.mark.slow
def test_fused_loss_trains_as_the_full_logits_loss(two_ranks, shakespeare_data, tmp_path):
    fused, _ = two_ranks
    plain = tmp_path / "plain"
    run(train_cmd(shakespeare_data, plain, "--max_steps", 4, "--grad_accum_steps", 1, "--fused_loss", "false", nproc=2))
    assert_close_losses(losses(plain), losses(fused))
    assert [r["grad_norm"] for r in metrics(fused)] == pytest.approx([r["grad_norm"] for r in metrics(plain)], rel=1e-5)
    assert metrics(fused)[-1]["val_loss"] == pytest.approx(metrics(plain)[-1]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_compiled_ddp_overlaps_its_buckets_and_keeps_the_losses(reference, shakespeare_data, tmp_path):
    # DDP(torch.compile(model)): Dynamo's DDPOptimizer splits the compiled graph at DDP's bucket
    # boundaries, so each bucket's all-reduce starts while backward still runs; accumulation
    # (no_sync on the first micro-batch) must not change that or the losses.
    out = tmp_path / "compiled"
    cmd = train_cmd(
        shakespeare_data,
        out,
        "--max_steps",
        4,
        "--batch_size",
        2,
        "--grad_accum_steps",
        2,
        "--compile",
        "true",
        nproc=2,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env(), "TORCH_LOGS": "ddp_graphs"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "---submod_1 graph---" in proc.stderr, "the compiled graph was not split into DDP buckets"
    assert_close_losses(losses(reference), losses(out))
    first, second = metrics(out)[:2]
    assert first["tokens_per_s"] is None and second["tokens_per_s"] > 0  # compilation is not a training step
    # eval.py compiled, at training's micro-batch: the computation of the val_loss training logged at step 4.
    result = tmp_path / "eval.json"
    run(
        [
            sys.executable,
            str(REPO / "launch" / "eval.py"),
            "--ckpt",
            str(out),
            "--data",
            str(shakespeare_data),
            "--compile",
            "true",
            "--batch-size",
            "2",
            "--out",
            str(result),
        ]
    )
    logged = metrics(out)[-1]["val_loss"]
    assert json.loads(result.read_text())["loss"] == pytest.approx(logged, rel=1e-6, abs=0)


@pytest.mark.slow
def test_init_from_is_read_by_one_rank_and_trains_as_one_process(reference, shakespeare_data, tmp_path):
    source = tmp_path / "source.pt"
    run([sys.executable, str(REPO / "launch" / "export.py"), "--ckpt", str(reference), "--pt", str(source)])
    opens = tmp_path / "opens.log"
    audited = {**env_with_sitecustomize(tmp_path / "audit", AUDIT_OPENS), "OPENS_LOG": str(opens)}
    two = tmp_path / "two"
    cmd = train_cmd(shakespeare_data, two, "--max_steps", 4, "--init_from", source, nproc=2)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=audited)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(opens.read_text().split()) == {"0"}, "a rank other than 0 opened the weights file"
    one = tmp_path / "one"  # the oracle: one process reads it all, nothing is broadcast
    run(train_cmd(shakespeare_data, one, "--max_steps", 4, "--grad_accum_steps", 2, "--init_from", source))
    assert_close_losses(losses(one), losses(two))


@pytest.mark.slow
def test_two_node_launch_equals_one_node(reference, shakespeare_data, tmp_path):
    out = tmp_path / "two_nodes"
    port = free_port()
    args = ["--data", str(shakespeare_data), "--out", str(out), *TINY, "--max_steps", "4", "--grad_accum_steps", "1"]
    agents = []
    for _ in range(2):  # two torchrun agents = two "nodes" meeting at a c10d rendezvous
        rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=twonode"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *rdzv, TRAIN, *args]
        agents.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), [o[-4000:] for o in outputs]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert_close_losses(losses(reference), losses(out))


@pytest.mark.slow
def test_resume_after_kill_is_bitwise_exact(shakespeare_data, tmp_path):
    # A constant learning rate, so that max_steps changes nothing but where the run ends: the run
    # to be killed is endless (the kill surely lands mid-run, wherever), its resume ends at 14.
    extra = ["--ckpt_interval", 4, "--eval_interval", 7, "--lr_schedule", "constant"]
    full = tmp_path / "full"
    run(train_cmd(shakespeare_data, full, *extra, "--max_steps", 14))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(shakespeare_data, killed, *extra, "--max_steps", 100000),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    step_8 = killed / "checkpoints" / "step_00000008"
    wait_for(step_8.exists)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run(train_cmd(shakespeare_data, killed, *extra, "--max_steps", 14, "--resume", step_8))
    assert f"resumed from {step_8}" in resumed.stdout

    a, b = metrics(full), metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 15))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)  # bit for bit
        assert ra.get("val_loss") == rb.get("val_loss")


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_previous(shakespeare_data, tmp_path):
    extra = ["--max_steps", 8, "--ckpt_interval", 4, "--keep_ckpts", 5]
    out = tmp_path / "run"
    run(train_cmd(shakespeare_data, out, *extra))  # checkpoints at 4 and 8
    uninterrupted = losses(out)
    ckpts = out / "checkpoints"
    # What a kill during a save leaves behind: a temporary directory, half written.
    partial = ckpts / ".tmp-step_00000012-abc"
    partial.mkdir()
    (partial / "trainer.pt").write_bytes(b"\x00" * 100)
    # And the newest checkpoint cut short on disk.
    model_file = ckpts / "step_00000008" / "state" / "__0_0.distcp"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    resumed = run(train_cmd(shakespeare_data, out, *extra))
    assert "step_00000008" in resumed.stdout and "truncated" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step_00000004" in resumed.stdout
    assert losses(out) == uninterrupted  # steps 5..8 trained again, identically
    assert not partial.exists(), "the half-written directory is cleaned up after the next good save"


@pytest.mark.slow
def test_fp16_with_grad_scaler_runs_on_cpu(shakespeare_data, tmp_path):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    except RuntimeError as e:
        pytest.skip(f"this CPU build has no float16 autocast: {e}")
    out = tmp_path / "fp16"
    run(train_cmd(shakespeare_data, out, "--max_steps", 4, "--dtype", "float16"))
    records = metrics(out)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] + 0.5
    assert "skipped_steps" in records[-1]


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(shakespeare_data, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "wb"
    run(train_cmd(shakespeare_data, out, "--max_steps", 3, "--wandb", "offline"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb >= 0.19 writes offline runs as one binary protobuf log (read back by `wandb sync`);
    # every logged value is stored as its JSON text inside it.
    log = next(runs[0].glob("*.wandb")).read_bytes()
    for record in metrics(out):
        for key in ("loss", "grad_norm", "lr"):
            assert key.encode() in log and json.dumps(record[key]).encode() in log, (key, record)


@pytest.mark.slow
def test_resuming_on_another_world_size_gives_each_rank_its_own_random_stream(shakespeare_data, tmp_path):
    out = tmp_path / "regrow"
    run(train_cmd(shakespeare_data, out, "--max_steps", 2, "--ckpt_interval", 2, "--grad_accum_steps", 2))
    run(train_cmd(shakespeare_data, out, "--max_steps", 4, "--ckpt_interval", 2, "--grad_accum_steps", 1, nproc=2))
    rngs = torch.load(out / "checkpoints" / "step_00000004" / "trainer.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"]), "ranks would share dropout masks"


@pytest.mark.slow
def test_throughput_leaves_eval_and_checkpoint_time_out(shakespeare_data, tmp_path):
    out = tmp_path / "throughput"
    # An eval far longer than a step (made so): counted as training time, it would sink its window's tokens/s.
    eval_s = 3.0
    slow_eval = env_with_sitecustomize(tmp_path / "slow_eval", slowed("gpt2repro.evaluate", "val_loss", eval_s))
    cmd = train_cmd(shakespeare_data, out, "--max_steps", 9, "--eval_interval", 4, "--ckpt_interval", 4)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=slow_eval, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["step"]: r for r in metrics(out)}
    assert records[4]["eval_s"] >= eval_s and records[4]["ckpt_s"] > 0 and "eval_s" not in records[3]
    # The window right after eval + checkpoint (step 5 alone, log_interval 1): its training time, from
    # its tokens/s, is the step's own, far below the eval's that came before it.
    window_s = (records[5]["tokens"] - records[4]["tokens"]) / records[5]["tokens_per_s"]
    assert window_s < eval_s, records[5]


@pytest.mark.slow
def test_profile_steps_write_one_trace_per_rank_of_the_chosen_steps_only(shakespeare_data, tmp_path):
    out = tmp_path / "profiled"
    proc = run(train_cmd(shakespeare_data, out, "--max_steps", 4, "--profile_steps", "2:3", nproc=2))
    assert f"profile of steps 2-3: {out / 'profile'}/rank{{0..1}}/steps_2-3.pt.trace.json" in proc.stdout
    for rank in (0, 1):
        events = json.loads((out / "profile" / f"rank{rank}" / "steps_2-3.pt.trace.json").read_text())["traceEvents"]
        steps = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name", "").startswith("step ")}
        assert sorted(steps) == ["step 2", "step 3"], sorted(steps)
        # The model's matmuls (forward and backward), with their shapes, inside those steps.
        matmuls = [e for e in events if e.get("name") in ("aten::addmm", "aten::mm")]
        inside = [e for e in matmuls if any(a <= e["ts"] <= b for a, b in steps.values())]
        assert len(inside) >= 2 * 2 * 4, len(inside)  # 2 layers x (attention + MLP) x 2 steps, and more
        assert all("Input Dims" in e["args"] for e in inside)


@pytest.mark.slow
def test_a_run_judged_against_its_twin_is_on_track_at_every_eval(reference, shakespeare_data, tmp_path):
    out = tmp_path / "judged"  # the reference fixture's run again, judged against that run's val curve
    proc = run(train_cmd(shakespeare_data, out, "--max_steps", 4, "--grad_accum_steps", 2, "--reference", reference))
    evals = [r for r in metrics(out) if "val_loss" in r]
    assert evals and all(r["ref_val_loss"] == r["val_loss"] and r["ref_gap"] == 0.0 for r in evals), evals
    assert all(r["verdict"] == "on track" for r in evals)
    assert f"vs run {evals[-1]['val_loss']:.4f} (+0.0000): on track" in proc.stdout
    assert f"evals are judged against {reference} (dataset unknown)" in proc.stdout
