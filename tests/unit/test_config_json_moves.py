"""A run's config.json used as --config on another machine: what was "auto" when asked (config.json keeps it
under "requested") settles again for the machine that runs now, through Machine.this under faked device
properties, and Muon's lr and wsd's decay settle again for the new flags; what the user typed stays. (On the
same machine it is the same run: test_train_config's round trips, and bitwise through real training in
tests/distributed/test_train.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2repro import cli
from gpt2repro import config as C
from gpt2repro.presets import PRESETS
from gpt2repro.schema import to_json
from gpt2repro.settings import Machine, settle
from gpt2repro.train import run_record
from tests.fake_cuda import GiB, fake_gpu

REPO = Path(__file__).resolve().parents[2]


def _run_on(machine: Machine, config_file: Path, out: Path, **typed) -> C.TrainConfig:
    """What launch/train.py --config config_file [--typed ...] settles to on machine; its config.json written to
    out, as setup() writes it."""
    asked, given = cli.parse_overrides(cli.load_base(str(config_file)), [f"--{k}={v}" for k, v in typed.items()])
    cfg = settle(asked, machine, given)
    out.write_text(json.dumps(run_record(asked, cfg, machine.world_size, "data/owt")))
    return cfg


def _this_gpu(kind: str) -> Machine:
    with fake_gpu(kind):
        return Machine.this("cuda:0", 1, 1)


def test_a_cpu_prototypes_config_json_settles_again_on_an_h100_then_a_v100(tmp_path):
    prototype = PRESETS["gpt2-124m"].replace(n_layer=2, n_head=2, n_embd=64, total_batch_tokens=0, batch_size=4)
    cpu_file = tmp_path / "cpu.json"
    cpu_file.write_text(json.dumps(run_record(prototype, settle(prototype, Machine("cpu")), 1, "data/owt")))
    assert json.loads(cpu_file.read_text())["device"] == "cpu"  # what ran there, as the contract says

    h100_file, v100_file = tmp_path / "h100.json", tmp_path / "v100.json"
    on_h100 = _run_on(_this_gpu("sm90"), cpu_file, h100_file)
    assert (on_h100.device, on_h100.dtype, on_h100.compile, on_h100.fused_loss) == ("cuda", "bfloat16", "true", "false")
    assert (on_h100.gpu_memory_gb, on_h100.peak_tflops) == (80.0, 989.0)
    assert json.loads(h100_file.read_text())["requested"]["dtype"] == "auto"  # still auto, for the next machine

    on_v100 = _run_on(_this_gpu("sm70"), h100_file, v100_file)  # no bfloat16 tensor cores: float16 + GradScaler
    assert (on_v100.dtype, on_v100.gpu_memory_gb, on_v100.peak_tflops) == ("float16", 32.0, 125.0)
    back = _run_on(Machine("cpu"), v100_file, tmp_path / "cpu_again.json")
    assert back == settle(prototype, Machine("cpu"))  # and home again: the CPU run it started as


def test_what_the_user_typed_stays_on_the_next_machine(tmp_path):
    first = tmp_path / "typed.json"
    typed = dict(dtype="float32", compile="false", fused_loss="true", device="cuda", peak_tflops=500.0)
    _run_on(_this_gpu("sm90"), _preset_file(tmp_path, "gpt2-124m"), first, **typed)
    on_v100 = _run_on(_this_gpu("sm70"), first, tmp_path / "v100.json")
    assert {name: getattr(on_v100, name) for name in typed} == {
        "dtype": "float32",
        "compile": "false",
        "fused_loss": "true",
        "device": "cuda",
        "peak_tflops": 500.0,
    }


def test_a_1558m_file_settled_on_8_h100s_fits_one_a100_40gb_again(tmp_path):
    eight_h100 = Machine("cuda", 8, 8, 80 * GiB, "NVIDIA H100 80GB HBM3", True)
    h100_file = tmp_path / "1558m.json"
    wide = _run_on(eight_h100, _preset_file(tmp_path, "gpt2-1558m"), h100_file, strategy="auto", batch_size=16)
    assert wide.gpu_memory_gb == 80.0
    one_a100 = Machine("cuda", 1, 1, 40 * GiB, "NVIDIA A100-SXM4-40GB", True)
    narrow = _run_on(one_a100, h100_file, tmp_path / "a100.json")
    assert (narrow.gpu_memory_gb, narrow.peak_tflops) == (40.0, 312.0)
    assert narrow.strategy == settle(PRESETS["gpt2-1558m"], one_a100).strategy  # planned for this GPU
    assert narrow.total_batch_tokens == wide.total_batch_tokens  # the same global batch, split for 1 rank


def test_the_dry_run_of_a_cpu_runs_config_json_plans_for_the_gpu_asked(tmp_path):
    prototype = PRESETS["gpt2-124m"]
    cpu_file = tmp_path / "config.json"
    cpu_file.write_text(json.dumps(run_record(prototype, settle(prototype, Machine("cpu")), 1, "data/owt")))
    cmd = [sys.executable, "launch/train.py", "--config", str(cpu_file), "--dry_run", "true", "--gpu_memory_gb", "80"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    layout = next(line for line in proc.stdout.splitlines() if line.startswith("layout"))
    assert "bfloat16" in layout and "compile on" in layout and "on 1 GPU(s)" in layout, proc.stdout


def _preset_file(tmp_path: Path, preset: str) -> Path:
    path = tmp_path / f"{preset}.json"
    path.write_text(json.dumps(to_json(PRESETS[preset])))
    return path


def test_the_runs_other_autos_settle_again_for_the_new_flags(tmp_path):
    """Muon's lr (twice lr) and wsd's decay (20% of max_steps) were auto: reused with another --lr and --max_steps,
    config.json gives what the original command line with those flags gives."""
    asked = PRESETS["shakespeare-cpu"].replace(optimizer="muon", lr_schedule="wsd")
    first = tmp_path / "first.json"
    first.write_text(json.dumps(run_record(asked, settle(asked, Machine("cpu")), 1, "data/owt")))
    again = _run_on(Machine("cpu"), first, tmp_path / "again.json", lr=1e-3, max_steps=100)
    assert (again.muon_lr, again.decay_steps) == (2e-3, 20)
    assert again == settle(asked.replace(lr=1e-3, max_steps=100), Machine("cpu"))
    assert json.loads((tmp_path / "again.json").read_text())["requested"]["decay_steps"] == 0  # still auto


def test_a_malformed_requested_is_one_clear_error(tmp_path):
    record = run_record(PRESETS["gpt2-124m"], settle(PRESETS["gpt2-124m"], Machine("cpu")), 1, "data/owt")
    path = tmp_path / "config.json"
    for requested, message in (
        ([1, 2], '"requested" must be an object of fields as asked, got \\[1, 2\\]'),
        ({"dtype": "auto", "dtpe": "auto"}, 'in "requested", unknown field --dtpe; did you mean --dtype\\?'),
    ):
        path.write_text(json.dumps({**record, "requested": requested}))
        with pytest.raises(ValueError, match=f"Invalid config file {path}: {message}"):
            cli.load_base(str(path))
