"""--tune true against reality, with every premise forced rather than measured (the suite runs on loaded
machines): the layout it picks is the one left fast when all the others are slowed on purpose; its forecast
is the measured components added up (the chosen trial's steps and start-up, a timed evaluation, a checkpoint
at the measured write speed); with compile on each trial compiles its own static graph cold; hsdp's process
groups do not pile up trial after trial; and layouts that cannot fit (the planner's refusal, an out-of-memory
error) are reported as such, by both ranks alike."""

import json
import re
import subprocess
import sys

import pytest

from tests.distributed.helpers import (
    TINY,
    TRAIN,
    after_import,
    env_with_sitecustomize,
    free_port,
    metrics,
    run,
    slowed,
    train_cmd,
)

ROWS = 4  # sequences per optimizer step: micro-batches 4, 2, 1
FAST = (2, "true")  # the one layout not slowed: micro-batch 2, the fused loss on
SLOW_S = 1.0  # per step of every other layout: far above a step of the tests' tiny model on any machine
EVAL_SLOW_S = 0.3  # per evaluation pass, so the forecast's evaluation is surely a timed one

# Every layout but FAST sleeps SLOW_S per step (in the tune only: the real run's train_step is untouched), and
# the forecast's inputs are written to $RECORD: the chosen trial, the forecast, the measured write speed.
SLOW_BUT_ONE = after_import(
    "gpt2repro.tune",
    f"""import dataclasses, json, os, time
_step = module.train_step
def train_step(engine, *args, **kwargs):
    if (engine.cfg.batch_size, engine.cfg.fused_loss) != {FAST!r}:
        time.sleep({SLOW_S!r})
    return _step(engine, *args, **kwargs)
module.train_step = train_step
_speed = module._write_speed
seen = {{}}
def _write_speed(run_dir):
    seen["write_bps"] = _speed(run_dir)
    return seen["write_bps"]
module._write_speed = _write_speed
_copy = module._copy_speed
def _copy_speed(device):
    seen["copy_bps"] = _copy(device)
    return seen["copy_bps"]
module._copy_speed = _copy_speed
_measure = module.measure_forecast
def measure_forecast(best, *args, **kwargs):
    f = _measure(best, *args, **kwargs)
    record = dict(seen, step_s=best.step_s, first_step_s=best.first_step_s, state_bytes=best.state_bytes,
                  staged_bytes=best.staged_bytes,
                  forecast=dict(step_s=f.step_s, startup_s=f.startup_s, eval_s=f.eval_s, ckpt_s=f.ckpt_s,
                                evals=f.evals, ckpts=f.ckpts, total_s=f.total_s))
    with open(os.environ["RECORD"], "w") as out:
        json.dump(record, out)
    return f
module.measure_forecast = measure_forecast
""",
)


pytestmark = pytest.mark.slow  # real runs in real processes: the whole suite, not the fast tier


def test_tune_picks_the_fastest_layout_and_its_forecast_adds_up_what_it_measured(shakespeare_data, tmp_path):
    out, tuned, record = tmp_path / "run", tmp_path / "tuned.json", tmp_path / "record.json"
    environ = {
        **env_with_sitecustomize(
            tmp_path / "site", SLOW_BUT_ONE, slowed("gpt2repro.evaluate", "val_loss", EVAL_SLOW_S)
        ),
        "RECORD": str(record),
    }
    args = ["--batch_size", ROWS, "--max_steps", 20, "--eval_interval", 10, "--ckpt_interval", 10]
    args += ["--tune", "true", "--tune_out", tuned, "--tune_steps", 3, "--tune_warmup", 1]
    proc = run(train_cmd(shakespeare_data, out, *args), environ=environ)
    print(proc.stdout)
    assert not out.exists()  # nothing in the run directory
    rows = [line for line in proc.stdout.splitlines() if line.startswith("ddp micro")]
    assert len(rows) == 6 and not any("does not fit" in line for line in rows), rows  # micro 1, 2, 4; fused off, on
    # The layout left fast is the one chosen, written and printed as a command line.
    chosen = json.loads(tuned.read_text())
    assert (chosen["batch_size"], chosen["fused_loss"], chosen["grad_accum_steps"]) == (*FAST, ROWS // FAST[0])
    assert not chosen["tune"]
    assert "fastest that fits: ddp micro 2 x 2 | act-ckpt off | fused on" in proc.stdout
    assert "--batch_size 2 --grad_accum_steps 2 --activation_checkpointing false --fused_loss true" in proc.stdout
    # The forecast is the chosen trial's measurements added up: its median step over the steps after the
    # first, its first step as the start-up, 2 evals (steps 10, 20) as timed and 2 checkpoints' stalls: written in
    # the background (the default), the staging copy of the rank's state at the measured copy speed.
    r = json.loads(record.read_text())
    f = r["forecast"]
    assert (f["step_s"], f["startup_s"]) == (r["step_s"], r["first_step_s"])
    assert (f["evals"], f["ckpts"]) == (2, 2)
    assert f["eval_s"] >= EVAL_SLOW_S  # a timed evaluation (its pass sleeps that long), scaled to eval_tokens
    assert "write_bps" not in r and r["staged_bytes"] == r["state_bytes"]  # one rank: it stages all of it
    assert f["ckpt_s"] == pytest.approx(r["staged_bytes"] / r["copy_bps"], rel=1e-9)
    total = f["startup_s"] + 19 * f["step_s"] + 2 * f["eval_s"] + 2 * f["ckpt_s"]
    assert f["total_s"] == pytest.approx(total, rel=1e-9)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("forecast for this launch"))
    assert f"20 steps at {f['step_s']:.4f} s + start-up {f['startup_s']:.1f} s + 2 evals x {f['eval_s']:.2f} s" in line
    assert float(re.search(r"= \S+ \(([\d.]+) s\)", line).group(1)) == round(f["total_s"], 1)
    # The chosen layout runs as a config file, and the run prints the same kind of forecast in its first log
    # lines (its pace from step 2 on).
    real = tmp_path / "real"
    done = run([sys.executable, TRAIN, "--data", str(shakespeare_data), "--out", str(real), "--config", str(tuned)])
    assert metrics(real)[-1]["step"] == 20
    assert "forecast for this launch" in done.stdout.split("step      3/20")[0]


# With compile on: every inductor compile of the tune, with the step it fell in and whether its graph has a
# symbolic size, per trial (then the forecast's evaluation); each trial's first step; written to $RECORD. Only
# the fused loss off is tried.
COMPILES = after_import(
    "gpt2repro.tune",
    """import json, os, time, torch
import torch._inductor.compile_fx as cf
trials, now = [], {"step": None}
_compile = cf.compile_fx
def compile_fx(gm, inputs, *args, **kwargs):
    symbolic = any(isinstance(x, torch.SymInt) or (torch.is_tensor(x) and any(isinstance(s, torch.SymInt)
                   for s in x.shape)) for x in inputs)
    t0 = time.perf_counter()
    try:
        return _compile(gm, inputs, *args, **kwargs)
    finally:
        if trials:
            trials[-1]["compiles"].append({"step": now["step"], "symbolic": symbolic, "s": time.perf_counter() - t0})
cf.compile_fx = compile_fx
_step = module.train_step
def train_step(engine, step, *args, **kwargs):
    now["step"] = step
    return _step(engine, step, *args, **kwargs)
module.train_step = train_step
_timed = module._timed_trial
def _timed_trial(cfg, *args, **kwargs):
    trials.append({"batch_size": cfg.batch_size, "compiles": []})
    trial = _timed(cfg, *args, **kwargs)
    trials[-1]["first_step_s"] = trial.first_step_s
    return trial
module._timed_trial = _timed_trial
_eval = module._eval_seconds
def _eval_seconds(*args, **kwargs):
    trials.append({"batch_size": "the forecast's evaluation", "compiles": []})
    now["step"] = None
    return _eval(*args, **kwargs)
module._eval_seconds = _eval_seconds
_candidates = module.candidates
module.candidates = lambda *a, **k: [c for c in _candidates(*a, **k) if c.fused_loss == "false"]
_tune = module.tune
def tune(*args, **kwargs):
    best = _tune(*args, **kwargs)
    with open(os.environ["RECORD"], "w") as out:
        json.dump(trials, out)
    return best
module.tune = tune
""",
)


def test_with_compile_on_each_trial_compiles_its_own_static_graph_cold(shakespeare_data, tmp_path):
    """Micro-batch 1, then 2: without a fresh start the second would be a recompile with a symbolic batch
    (Dynamo's automatic dynamic shapes), a graph the real run never compiles, and its first step would miss
    the real compile. Each trial compiles in its first step only, static graphs only, and its first step
    holds those compiles."""
    record = tmp_path / "compiles.json"
    environ = {**env_with_sitecustomize(tmp_path / "site", COMPILES), "RECORD": str(record)}
    environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")  # cold on disk too, as a first run's
    args = ["--batch_size", 2, "--compile", "true", "--tune", "true", "--tune_steps", 2, "--tune_warmup", 1]
    proc = run(train_cmd(shakespeare_data, tmp_path / "run", *args), environ=environ, timeout=900)
    print(proc.stdout)
    *trials, evaluation = json.loads(record.read_text())
    assert [t["batch_size"] for t in trials] == [1, 2] and evaluation["compiles"]
    for trial in trials:
        compiles = trial["compiles"]
        assert compiles and all(c["step"] == 1 for c in compiles), trial  # cold, in the first step; no recompile
        assert not any(c["symbolic"] for c in compiles), trial  # the static graph of its own micro-batch
        assert trial["first_step_s"] >= sum(c["s"] for c in compiles), trial
    assert "each compiled cold, its own static graph" in proc.stdout


# The number of live process groups after each hsdp trial and after the forecast, per rank, into $RECORD.
GROUPS = after_import(
    "gpt2repro.tune",
    """import json, os
from torch.distributed import distributed_c10d as c10d
counts = []
_candidates = module.candidates
module.candidates = lambda *a, **k: [c for c in _candidates(*a, **k) if (c.strategy, c.fused_loss) == ("hsdp", "false")]
_run_trial = module.run_trial
def run_trial(*args, **kwargs):
    trial = _run_trial(*args, **kwargs)
    counts.append(len(c10d._world.pg_map))
    return trial
module.run_trial = run_trial
_measure = module.measure_forecast
def measure_forecast(*args, **kwargs):
    forecast = _measure(*args, **kwargs)
    counts.append(len(c10d._world.pg_map))
    with open(os.path.join(os.environ["RECORD"], os.environ["RANK"] + ".json"), "w") as out:
        json.dump(counts, out)
    return forecast
module.measure_forecast = measure_forecast
""",
)


def test_hsdp_trials_do_not_pile_up_process_groups(shakespeare_data, tmp_path):
    """Two nodes of one rank (two torchrun agents), so hsdp applies: its 2-D mesh's process groups (NCCL
    communicators on GPUs) are made once, not once per trial and again for the forecast."""
    record = tmp_path / "groups"
    record.mkdir()
    environ = {**env_with_sitecustomize(tmp_path / "site", GROUPS), "RECORD": str(record)}
    port, agents = free_port(), []
    args = ["--data", str(shakespeare_data), "--out", str(tmp_path / "run"), *TINY]
    args += ["--batch_size", "2", "--tune", "true", "--tune_steps", "2", "--tune_warmup", "1"]
    for _ in range(2):  # two torchrun agents = two "nodes" meeting at a c10d rendezvous
        rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=hsdptune"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *rdzv, TRAIN, *args]
        agents.append(subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), [o[-4000:] for o in outputs]
    print(outputs[0])
    assert sum(line.startswith("hsdp micro") for o in outputs for line in o.splitlines()) == 2  # micro 1, 2
    for rank in (0, 1):
        counts = json.loads((record / f"{rank}.json").read_text())
        assert len(counts) == 3 and len(set(counts)) == 1, (rank, counts)  # 2 trials, then the forecast


# An out-of-memory error, forced for micro-batch 4 without activation checkpointing (as CUDA words it).
OOM_AT_4 = after_import(
    "gpt2repro.tune",
    """import torch
_step = module.train_step
def train_step(engine, *args, **kwargs):
    if engine.cfg.batch_size == 4 and not engine.cfg.activation_checkpointing:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
    return _step(engine, *args, **kwargs)
module.train_step = train_step
_tune = module.tune
def tune(*args, **kwargs):
    import json, os
    best = _tune(*args, **kwargs)
    layout = {name: getattr(best.cfg, name) for name in module.LAYOUT_FIELDS}
    with open(os.path.join(os.environ["CHOICES"], "rank" + os.environ.get("RANK", "0") + ".json"), "w") as f:
        json.dump(layout, f)
    return best
module.tune = tune
""",
)


def test_layouts_that_cannot_fit_are_reported_by_both_ranks_alike(shakespeare_data, tmp_path):
    """On 2 ranks: ddp's micro-batch 8 refused by the planner (--gpu_memory_gb 0.12), micro-batch 4 out of
    memory on both ranks, then fitting with activation checkpointing; no traceback, and both ranks choose the
    same layout, the one written to --tune_out."""
    choices = tmp_path / "choices"
    choices.mkdir()
    environ = {**env_with_sitecustomize(tmp_path / "site", OOM_AT_4), "CHOICES": str(choices)}
    tuned = tmp_path / "tuned.json"
    args = ["--batch_size", 8, "--gpu_memory_gb", 0.12, "--tune", "true", "--tune_out", tuned]
    args += ["--tune_steps", 2, "--tune_warmup", 1]
    proc = run(train_cmd(shakespeare_data, tmp_path / "run", *args, nproc=2), environ=environ)
    print(proc.stdout)
    assert "Traceback" not in proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("ddp micro", "fsdp micro"))]
    assert any(line.startswith("ddp micro 8") and "does not fit: the planner estimates" in line for line in rows)
    assert any("micro 4 x 2 | act-ckpt on" in line and "does not fit" not in line for line in rows)
    assert any("micro 4 x 2 | act-ckpt off" in line and "does not fit: out of memory" in line for line in rows)
    ranks = [json.loads((choices / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    written = json.loads(tuned.read_text())
    assert {k: written[k] for k in ranks[0]} == ranks[0]
