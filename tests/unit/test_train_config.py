import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gpt2repro import cli, shards
from gpt2repro import config as C
from gpt2repro.batch import describe_batch
from gpt2repro.data import BatchSpec, ShardLoader
from gpt2repro.presets import PRESETS
from gpt2repro.schedule import lr_at
from gpt2repro.settings import Machine, settle
from gpt2repro.train import run_record

REPO = Path(__file__).resolve().parents[2]


def test_cosine_schedule_with_warmup():  # steps are 1-based, as logged: step 1 is the first update
    cfg = C.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(61, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(111, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)


def test_wsd_and_constant_schedules():
    wsd = C.TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100, lr_schedule="wsd", decay_steps=20)
    assert lr_at(80, wsd) == 1.0 and lr_at(91, wsd) == pytest.approx(0.5) and lr_at(101, wsd) == 0.0
    const = C.TrainConfig(lr=0.3, warmup_steps=0, lr_schedule="constant")
    assert lr_at(12345, const) == 0.3


def test_gpt2_124m_preset_is_nanogpt_with_gpt3_batch():
    cfg = C.resolve(PRESETS["gpt2-124m"], world_size=8)
    assert (cfg.batch_size, cfg.block_size, cfg.grad_accum_steps) == (16, 1024, 4)
    assert cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * 8 == cfg.total_batch_tokens == 2**19
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == (6e-4, 6e-5, 2000, 600_000)
    assert (cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.grad_clip) == (0.1, 0.9, 0.95, 1.0)
    assert C.resolve(PRESETS["gpt2-124m"], world_size=1).grad_accum_steps == 32


def _dry_run(*argv: str) -> str:
    """launch/train.py --dry_run true, in this process (no data or GPU needed)."""
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert launch.main([*argv, "--dry_run", "true"]) == 0
    return out.getvalue()


BATCH_LINE = re.compile(r"batch: ([\d,]+) tokens per step = (\d+) sequences x (\d+) tokens x (\d+) rank\(s\) x (\d+)")


@pytest.mark.parametrize("preset", ["gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m"])
def test_every_preset_runs_on_every_common_world_size(preset):
    for world_size in (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64):  # 8 x N nodes up to 8 nodes
        text = _dry_run("--config", preset, "--world_size", str(world_size), "--gpu_memory_gb", "80")
        tokens, b, t, w, accum = (int(g.replace(",", "")) for g in BATCH_LINE.search(text).groups())
        assert w == world_size and b * t * w * accum == tokens
        assert b <= PRESETS[preset].batch_size  # a smaller micro-batch always fits where the preset's did
        if world_size & (world_size - 1) == 0:  # powers of two split GPT-3's 0.5M tokens exactly
            assert tokens == 2**19, (world_size, text)
        else:
            assert abs(tokens - 2**19) <= 0.1 * 2**19, (world_size, text)


def test_readme_cluster_commands_pass_their_dry_runs():
    # README: 4 nodes x 8 GPUs of gpt2-124m; train.sbatch's default: 2 nodes x 8 GPUs.
    assert "524,288 tokens per step = 16 sequences" in _dry_run("--config", "gpt2-124m", "--world_size", "32")
    env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    sbatch = [str(REPO / "launch" / "slurm" / "train.sbatch"), "--config", "gpt2-124m", "--data", "d", "--out", "o"]
    nodes = subprocess.run(["bash", *sbatch], env=env, capture_output=True, text=True, check=True).stdout
    assert nodes.count("torchrun --nnodes=2 --nproc_per_node=8") == 2
    assert "16 sequences x 1024 tokens x 16 rank(s) x 2" in _dry_run("--config", "gpt2-124m", "--world_size", "16")


def given_resolve(base: C.TrainConfig, world_size: int, *argv: str) -> C.TrainConfig:
    cfg, given = cli.parse_overrides(base, list(argv))
    return C.resolve(cfg, world_size, given)


def test_fields_typed_on_the_command_line_beat_what_the_preset_derives():
    base = PRESETS["gpt2-124m"]
    cfg, given = cli.parse_overrides(base, ["--batch_size", "8", "--grad_accum_steps", "2"])
    cfg = C.resolve(cfg, 8, given)
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.total_batch_tokens) == (8, 2, 8 * 1024 * 8 * 2)
    cfg, given = cli.parse_overrides(base, ["--batch_size", "12"])  # the preset's total bends to it
    assert C.resolve(cfg, 8, given).batch_size == 12
    with pytest.raises(ValueError, match="disagree"):
        given_resolve(base, 8, "--grad_accum_steps", "2", "--total_batch_tokens", "1000000")
    with pytest.raises(ValueError, match=r"batch sizes that divide it: \[1, 2, 3, 5, 6, 10, 15, 30\]"):
        given_resolve(base, 16, "--total_batch_tokens", "491520", "--batch_size", "16")
    assert "grad_accum_steps given" in _dry_run("--config", "gpt2-124m", "--batch_size", "8", "--grad_accum_steps", "2")


def test_a_typed_batch_size_that_moves_the_step_much_gets_its_own_warning_line():
    base = PRESETS["gpt2-124m"]  # 524,288 tokens per step
    cfg, given = cli.parse_overrides(base, ["--batch_size", "64"])
    text = describe_batch(cfg, C.resolve(cfg, 16, given), 16, given)
    warning = text.splitlines()[1]
    assert warning.startswith("warning: --batch_size 64 on 16 rank(s) makes each step 1,048,576 tokens, 2.00x")
    for ok in (["--batch_size", "8"], ["--batch_size", "64", "--total_batch_tokens", "1048576"]):
        cfg, given = cli.parse_overrides(base, ok)
        assert "warning" not in describe_batch(cfg, C.resolve(cfg, 16, given), 16, given)


def test_overrides_parse_both_forms_and_types():
    cfg, given = cli.parse_overrides(PRESETS["gpt2-124m"], ["--lr=3e-4", "--max_steps", "5e3", "--bias", "false"])
    assert (cfg.lr, cfg.max_steps, cfg.bias) == (3e-4, 5000, False)
    assert given == {"lr", "max_steps", "bias"}


def test_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"n_layer": 2, "lr": 0.01, "max_steps": 5e3}')
    assert (cli.load_base(str(path)).n_layer, cli.load_base(str(path)).max_steps) == (2, 5000)
    path.write_text('{"n_layers": 2}')
    with pytest.raises(ValueError, match="did you mean --n_layer"):
        cli.load_base(str(path))
    path.write_text('{"lr": "1e-3", "n_layer": 2.5, "bias": "yes"}')
    with pytest.raises(ValueError, match="lr must be a number.*n_layer must be an integer.*bias must be true or false"):
        cli.load_base(str(path))


def test_a_runs_own_config_json_is_a_valid_config(tmp_path):
    cfg = settle(PRESETS["gpt2-124m"], Machine("cpu", world_size=16))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(run_record(PRESETS["gpt2-124m"], cfg, 16, "data/owt")))
    again = settle(cli.load_base(str(path)), Machine("cpu", world_size=8))  # the same global batch on 8 ranks
    assert again.total_batch_tokens == cfg.total_batch_tokens and again.grad_accum_steps == 4
    assert again.replace(grad_accum_steps=cfg.grad_accum_steps) == cfg


# A CPU, one 8-GPU node of H100s, and 32 V100s of 16 GB in nodes of 8 (float16, hsdp for the big sizes).
MACHINES = {
    "cpu": Machine("cpu"),
    "8xH100": Machine("cuda", 8, 8, 80 * 2**30, "NVIDIA H100 80GB HBM3", True),
    "32xV100": Machine("cuda", 32, 8, 16 * 2**30, "Tesla V100-SXM2-16GB", False),
}


@pytest.mark.parametrize("machine", list(MACHINES))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_settles_to_concrete_values_that_round_trip_through_config_json(preset, machine, tmp_path):
    asked, here = PRESETS[preset], MACHINES[machine]
    if asked.init_from:  # the shape comes from the source's weights (the launcher reads it first)
        asked = asked.replace(init_from="")
    cfg = settle(asked, here)
    assert cfg.device in ("cpu", "cuda") and cfg.dtype in ("float32", "bfloat16", "float16")
    assert cfg.compile in ("true", "false") and cfg.fused_loss in ("true", "false")
    assert cfg.strategy in ("ddp", "fsdp", "hsdp")
    assert cfg.batch_size * cfg.grad_accum_steps * here.world_size * cfg.block_size == cfg.total_batch_tokens
    record = run_record(asked, cfg, here.world_size, "data/owt")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    written = json.loads(path.read_text())
    assert set(written) == set(C.FIELDS) | set(C.RUN_KEYS)  # every field, and only the run's own keys
    assert all(isinstance(written[name], bool) for name in ("compile", "fused_loss"))  # typed, not "true" strings
    assert written["requested"]["dtype"] == "auto" and written["dtype"] == cfg.dtype  # what was asked, beside
    assert settle(cli.load_base(str(path)), here) == cfg  # the same run again
    # and through the command line, as `--config RUN/config.json --field value` reads it
    again, given = cli.parse_overrides(cli.load_base(str(path)), ["--max_steps", str(cfg.max_steps)])
    assert settle(again, here, given) == cfg


def test_settling_decides_for_the_machine():
    h100, v100, cpu = MACHINES["8xH100"], MACHINES["32xV100"], MACHINES["cpu"]
    assert settle(C.TrainConfig(), h100).dtype == "bfloat16" and settle(C.TrainConfig(), v100).dtype == "float16"
    assert (settle(C.TrainConfig(), cpu).compile, settle(C.TrainConfig(), cpu).fused_loss) == ("false", "true")
    assert (settle(C.TrainConfig(), h100).compile, settle(C.TrainConfig(), h100).fused_loss) == ("true", "false")
    # 1558M fits ddp in 40 GB; in 24 GB on 4 nodes of 8 it shards within the nodes; in 16 GB across all.
    a100s, l4s = Machine("cuda", 32, 8, 40 * 2**30), Machine("cuda", 32, 8, 24 * 2**30)
    assert [settle(PRESETS["gpt2-1558m"], m).strategy for m in (a100s, l4s, v100)] == ["ddp", "hsdp", "fsdp"]
    assert settle(PRESETS["gpt2-124m"], h100).strategy == "ddp"
    assert settle(C.TrainConfig(optimizer="muon", lr=1e-3), cpu).muon_lr == 2e-3
    assert settle(C.TrainConfig(lr_schedule="wsd", max_steps=1000), cpu).decay_steps == 200
    assert settle(C.TrainConfig(), h100).peak_tflops == 989.0 and settle(C.TrainConfig(), cpu).peak_tflops == 0.0
    typed = C.TrainConfig(dtype="float32", compile="false", fused_loss="true", strategy="fsdp")
    assert settle(typed, h100).replace(gpu_memory_gb=0, peak_tflops=0, device="auto") == typed.replace(
        total_batch_tokens=typed.batch_size * 1024 * 8
    )  # typed values are kept as they are
    # lm-eval's tasks in training need the whole model on every rank: a sharded run says so, auto or asked.
    with pytest.raises(ValueError, match="eval_tasks needs every rank to hold the whole model.*launch/eval.py"):
        settle(PRESETS["gpt2-1558m"].replace(eval_tasks="hellaswag"), v100)
    assert settle(PRESETS["gpt2-124m"].replace(eval_tasks="hellaswag"), h100).strategy == "ddp"


def _loader(tmp_path, spec: BatchSpec) -> ShardLoader:
    data = tmp_path / "d"
    if not data.exists():
        data.mkdir()
        rng = np.random.default_rng(0)
        for i, n in enumerate((530, 1000, 77, 641)):
            shards.write_shard(data / f"x_train_{i:06d}.bin", rng.integers(0, 1000, n))
    return ShardLoader(str(data), block_size=16, vocab_size=1000, spec=spec, seed=3, device="cpu")


def test_global_batches_do_not_depend_on_ranks_or_accumulation(tmp_path):
    one = _loader(tmp_path, BatchSpec(batch_size=4, grad_accum_steps=2, world_size=1, rank=0))
    ranks = [_loader(tmp_path, BatchSpec(batch_size=4, grad_accum_steps=1, world_size=2, rank=r)) for r in (0, 1)]
    for step in range(1, 31):  # several epochs
        a = sorted(map(tuple, np.concatenate([one.batch(step, m)[0].numpy() for m in range(2)]).tolist()))
        b = sorted(map(tuple, np.concatenate([ld.batch(step, 0)[0].numpy() for ld in ranks]).tolist()))
        assert a == b


def test_an_epoch_visits_every_window_once(tmp_path):
    loader = _loader(tmp_path, BatchSpec(batch_size=1, grad_accum_steps=1, world_size=1, rank=0))
    n = loader.num_windows
    assert n == sum((size - 1) // 16 for size in (530, 1000, 77, 641))
    first_epoch = [tuple(loader.batch(step, 0)[0][0].tolist()) for step in range(1, n + 1)]
    assert len(set(first_epoch)) == n  # without replacement
    second_epoch = [tuple(loader.batch(step, 0)[0][0].tolist()) for step in range(n + 1, 2 * n + 1)]
    assert set(second_epoch) == set(first_epoch) and second_epoch != first_epoch


def test_a_run_from_before_a_field_existed_still_resumes(tmp_path):
    from gpt2repro.train import check_run_dir

    here = Machine("cpu")
    cfg = settle(PRESETS["shakespeare-cpu"], here)
    # As config.json was written before it recorded settled values: the request, autos and all.
    written = {**C.resolve(PRESETS["shakespeare-cpu"], 1).to_dict(), "world_size": 1, "data": "data/shakespeare"}
    for added_since in ("fused_loss", "fp8", "init_from"):  # fields newer than some runs on disk
        del written[added_since]
    (tmp_path / "config.json").write_text(json.dumps(written))
    check_run_dir(tmp_path, cfg, here)  # the run had the defaults, settled as here: the same run
    with pytest.raises(ValueError, match=r"init_from: '' -> 'gpt2'"):
        check_run_dir(tmp_path, cfg.replace(init_from="gpt2"), here)
    with pytest.raises(ValueError, match=r"dtype: 'float32' -> 'bfloat16'"):
        check_run_dir(tmp_path, cfg.replace(dtype="bfloat16"), here)
