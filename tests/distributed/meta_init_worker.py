"""FSDP's meta-device build against today's plain build (run under torchrun by test_fsdp.py):
every parameter, gathered whole, must equal GPT(config)'s after the same seed, bit for bit,
with and without fp8 (torchao's Float8Linear, converted before sharding). And no FSDP model (nor
the process groups it holds) outlives the teardown: left to the interpreter's exit, a loaded
machine aborted there ("terminate called without an active exception")."""

import gc
import importlib.util
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from gpt2repro import distributed as D  # noqa: E402
from gpt2repro import parallel  # noqa: E402
from gpt2repro.model import GPT, GPTConfig  # noqa: E402

# Odd sizes, so that some shards are uneven (FSDP pads them).
CONFIG = GPTConfig(vocab_size=1001, block_size=24, n_layer=3, n_head=3, n_embd=48, pad_vocab_multiple=64)

# 100M parameters, none of them large: the meta build's peak is this rank's shards plus one full
# parameter at a time, where a full build would first hold all 400 MB.
BIG = GPTConfig(vocab_size=1024, block_size=64, n_layer=8, n_head=16, n_embd=1024)


def check(info: D.DistInfo) -> None:
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = parallel.build_model(BIG, parallel.layout("fsdp", info), "float32", seed=0)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) * 1024
    full_bytes = 4 * sum(p.numel() for p in big.parameters())  # the DTensors' global sizes
    assert grown < 0.8 * full_bytes, f"peak grew {grown / 2**20:.0f} MiB for a {full_bytes / 2**20:.0f} MiB model"
    del big
    torch.manual_seed(1337)
    reference = dict(GPT(CONFIG).named_parameters())
    sharded = parallel.build_model(CONFIG, parallel.layout("fsdp", info), "float32", seed=1337)
    assert not any(p.is_meta for p in sharded.parameters())
    local = sum(p.to_local().numel() for p in sharded.parameters())
    assert local < sum(p.numel() for p in reference.values()) * 0.6, "each rank holds about half"
    for name, param in sharded.named_parameters():
        assert torch.equal(param.full_tensor(), reference[name].detach()), name
    if info.is_main:
        print(
            f"meta init equals the plain init: {len(reference)} tensors; peak grew {grown / 2**20:.0f} MiB "
            f"for a {full_bytes / 2**20:.0f} MiB model"
        )
    if importlib.util.find_spec("torchao") is not None:
        # torchao's Float8Linear runs (emulated) on a CPU; only the trainer's GPU check would refuse it.
        parallel.fp8_training.check_supported = lambda device: None
        converted = parallel.build_model(CONFIG, parallel.layout("fsdp", info), "float32", seed=1337, fp8=True)
        assert type(converted.transformer.h[0].attn.c_proj).__name__ == "Float8Linear"
        for name, param in converted.named_parameters():
            assert torch.equal(param.full_tensor(), reference[name].detach()), f"fp8: {name}"
        if info.is_main:
            print("fp8 meta init equals the plain init")


with D.distributed_context("cpu") as info:
    check(info)
leaked = [type(o).__name__ for o in gc.get_objects() if isinstance(o, FSDPModule)]
assert not leaked, f"FSDP modules alive after the teardown: {leaked}"
if info.is_main:
    print("no FSDP model outlives the teardown")
