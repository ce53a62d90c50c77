"""The compile cache's fingerprint and its one line (gpt2repro/compile_cache.py); the cache at work with real
launches is tests/distributed/test_compile_cache.py."""

import json

import pytest

from gpt2repro import compile_cache
from gpt2repro.config import TrainConfig
from gpt2repro.distributed import DistInfo


def test_a_fingerprint_changes_with_the_program_not_with_what_never_reaches_a_graph():
    info = DistInfo()
    base = compile_cache.fingerprint(TrainConfig(compile="true"), info)
    assert base == compile_cache.fingerprint(TrainConfig(compile="true", max_steps=7, log_interval=3), info)
    for changed in ({"n_layer": 4}, {"batch_size": 2}, {"fused_loss": "false"}, {"dtype": "bfloat16"}):
        other = compile_cache.fingerprint(TrainConfig(compile="true", **changed), info)
        (name,) = changed
        assert compile_cache.differences(base, other) == [f"{name} {base['config'][name]} -> {other['config'][name]}"]
    assert compile_cache.differences({**base, "torch": "2.11.0"}, base) == [f"torch 2.11.0 -> {base['torch']}"]


def test_the_cache_is_kept_emptied_or_left_to_the_user(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "")  # restored after the test, whatever use() sets
    monkeypatch.setattr(compile_cache, "_ours", "")
    cfg, info = TrainConfig(compile="true"), DistInfo()
    cache = tmp_path / "compile_cache"
    assert compile_cache.use(tmp_path, cfg.replace(compile="false"), info) is None
    assert "(new:" in compile_cache.use(tmp_path, cfg, info)
    assert compile_cache.os.environ[compile_cache.ENV] == str(cache)  # what Inductor reads; set again by each run
    (cache / "kernel.so").write_text("compiled")
    assert "(kept from an earlier launch" in compile_cache.use(tmp_path, cfg, info)
    assert (cache / "kernel.so").exists()
    line = compile_cache.use(tmp_path, cfg.replace(n_embd=64), info)
    assert line.endswith("was made for another program (n_embd 768 -> 64); compiling afresh")
    assert not (cache / "kernel.so").exists()
    assert json.loads((cache / compile_cache.FINGERPRINT).read_text())["config"]["n_embd"] == 64
    (cache / compile_cache.FINGERPRINT).write_text("{not json")
    assert "(its fingerprint.json is unreadable); compiling afresh" in compile_cache.use(tmp_path, cfg, info)
    # Inductor's own default, which Inductor writes into the environment once it has compiled (a parent process's
    # compile, inherited): not the user's choice.
    monkeypatch.setenv(compile_cache.ENV, compile_cache.default_cache_dir())
    assert "(kept from an earlier launch" in compile_cache.use(tmp_path, cfg, info)
    monkeypatch.setenv(compile_cache.ENV, "/elsewhere")  # the user's own choice
    assert compile_cache.use(tmp_path, cfg, info) == (
        f"compile cache: {compile_cache.ENV}=/elsewhere is set, so the run directory keeps none"
    )


def test_on_a_gpu_the_fingerprint_names_the_card_and_its_capability():
    from tests.fake_cuda import fake_gpu

    cfg = TrainConfig(compile="true")
    with fake_gpu("sm90"):
        gpu = compile_cache.fingerprint(cfg, DistInfo(device="cuda:0"))
    assert gpu["device"] == "NVIDIA H100 80GB HBM3 (sm_90)"
    cpu = compile_cache.fingerprint(cfg, DistInfo())
    assert compile_cache.differences(cpu, gpu) == [f"device {cpu['device']} -> NVIDIA H100 80GB HBM3 (sm_90)"]


def test_a_compile_cache_that_cannot_be_used_is_one_error_naming_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "")
    (tmp_path / "compile_cache").write_text("not a directory")
    with pytest.raises(ValueError) as error:
        compile_cache.use(tmp_path, TrainConfig(compile="true"), DistInfo())
    assert str(error.value) == (
        f"the compile cache {tmp_path / 'compile_cache'} cannot be used (File exists); remove it, or set "
        "TORCHINDUCTOR_CACHE_DIR to a directory of your own"
    )
