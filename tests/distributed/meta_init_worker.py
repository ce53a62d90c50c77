"""FSDP's meta-device build against today's plain build (run under torchrun by test_fsdp.py):
every parameter, gathered whole, must equal GPT(config)'s after the same seed, bit for bit."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from gpt2repro import distributed as D  # noqa: E402
from gpt2repro import parallel  # noqa: E402
from gpt2repro.model import GPT, GPTConfig  # noqa: E402

# Odd sizes, so that some shards are uneven (FSDP pads them).
CONFIG = GPTConfig(vocab_size=1001, block_size=24, n_layer=3, n_head=3, n_embd=48, pad_vocab_multiple=64)

with D.distributed_context("cpu") as info:
    torch.manual_seed(1337)
    reference = dict(GPT(CONFIG).named_parameters())
    sharded = parallel.build_model(CONFIG, "fsdp", "float32", "cpu", seed=1337)
    assert not any(p.is_meta for p in sharded.parameters())
    local = sum(p.to_local().numel() for p in sharded.parameters())
    assert local < sum(p.numel() for p in reference.values()) * 0.6, "each rank holds about half"
    for name, param in sharded.named_parameters():
        assert torch.equal(param.full_tensor(), reference[name].detach()), name
    if info.is_main:
        print(f"meta init equals the plain init: {len(reference)} tensors")
