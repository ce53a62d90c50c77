"""Named configs: GPT-2's four sizes (nanoGPT's recipe with GPT-3's batch), llm.c's recipes flag for flag,
nanoGPT's Shakespeare finetune, and a CPU run of minutes. `--config NAME` starts from one."""

from __future__ import annotations

from gpt2repro.config import TrainConfig
from gpt2repro.model import MODEL_FIELDS, GPTConfig


def model_shape(preset: str) -> dict:
    """GPTConfig.from_preset(preset)'s shape as TrainConfig fields."""
    shape = GPTConfig.from_preset(preset)
    return {name: getattr(shape, name) for name in MODEL_FIELDS}


# GPT-2 on OpenWebText as nanoGPT's train_gpt2 config (600k steps, 2000 warmup, lr 6e-4) with
# GPT-3's 0.5M-token batch: 2**19 = 512 sequences of 1024, which 1 to 512 ranks (any power of
# two) split evenly; other world sizes get the nearest global batch they can split (resolve_batch).
_GPT2_124M = TrainConfig(**model_shape("gpt2-124m"), batch_size=16, total_batch_tokens=2**19)
_LLMC_124M = TrainConfig(
    **model_shape("gpt2-124m"),
    batch_size=64,
    total_batch_tokens=524_288,
    lr=6e-4,
    min_lr=0.0,
    warmup_steps=700,
    max_steps=18_865,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_interval=250,
    eval_tokens=10 * 2**20,
    ckpt_interval=5000,
    reference="llmc-124m-fineweb10B",
)
PRESETS: dict[str, TrainConfig] = {
    "gpt2-124m": _GPT2_124M,
    # GPT-3 paper, table 2.1: learning rates for the comparable sizes.
    "gpt2-350m": _GPT2_124M.replace(**model_shape("gpt2-350m"), lr=3e-4, min_lr=3e-5, batch_size=8),
    "gpt2-774m": _GPT2_124M.replace(**model_shape("gpt2-774m"), lr=2.5e-4, min_lr=2.5e-5, batch_size=4),
    "gpt2-1558m": _GPT2_124M.replace(**model_shape("gpt2-1558m"), lr=2e-4, min_lr=2e-5, batch_size=2),
    # llm.c's recipes, flag for flag (scripts/run_gpt2_*.sh): -b micro-batch, -d tokens per step, -l lr,
    # -q the lr's final fraction (0: decay to zero; nanoGPT keeps 10%), -u warmup, -x steps, -c weight
    # decay, -v eval interval, -n checkpoint interval; clip 1.0 and betas (0.9, 0.95) are llm.c's defaults,
    # val is the first 20 batches of 64 x 1024 x 8 ranks = 10 x 2**20 tokens.
    # 124M: FineWeb 10B (18,865 steps, 9.9B tokens), its curve is the llmc-124m-fineweb10B reference.
    "gpt2-124m-llmc": _LLMC_124M,
    # 350M and 774M: FineWeb 100B, 31.5B and 150B tokens.
    "gpt2-350m-llmc": _LLMC_124M.replace(
        **model_shape("gpt2-350m"), lr=3e-4, max_steps=60_000, ckpt_interval=2000, reference=""
    ),
    "gpt2-774m-llmc": _LLMC_124M.replace(
        **model_shape("gpt2-774m"), batch_size=32, lr=2.5e-4, max_steps=286_102, ckpt_interval=4000, reference=""
    ),
    # 1558M: FineWeb-Edu 100B, ~1M tokens per step, 32,000 steps (33.6B tokens), decay to 10%.
    "gpt2-1558m-llmc": _LLMC_124M.replace(
        **model_shape("gpt2-1558m"),
        batch_size=16,
        total_batch_tokens=1_048_576,
        lr=6e-4,
        min_lr=6e-5,
        max_steps=32_000,
        ckpt_interval=2000,
        reference="",
    ),
    # nanoGPT's config/finetune_shakespeare.py: OpenAI's weights (the shape comes from them),
    # 32 x 1024 tokens per step, 20 steps at a constant 3e-5. --init_from gpt2-xl as nanoGPT.
    "finetune-shakespeare": TrainConfig(
        init_from="gpt2",
        batch_size=1,
        grad_accum_steps=32,
        max_steps=20,
        lr=3e-5,
        min_lr=3e-5,
        warmup_steps=0,
        lr_schedule="constant",
        eval_interval=5,
        eval_tokens=40 * 1024,
        log_interval=1,
        ckpt_interval=20,
    ),
    # About three minutes on a 2-core CPU (3,700 tokens/s): 1.5 epochs of tiny Shakespeare in GPT-2
    # BPE. Measured there, at a fixed time budget, more small steps beat a wider model: n_embd 32
    # at micro-batch 8 (1300 steps) reached val 4.90 where n_embd 64 at 16 (500 steps) reached 5.22.
    "shakespeare-cpu": TrainConfig(
        n_layer=4,
        n_head=4,
        n_embd=32,
        block_size=64,
        batch_size=8,
        grad_accum_steps=1,
        max_steps=1300,
        lr=8e-3,
        min_lr=8e-4,
        warmup_steps=60,
        dropout=0.0,
        eval_interval=500,
        eval_tokens=16_384,
        log_interval=100,
        ckpt_interval=500,
        compile="false",
    ),
}
