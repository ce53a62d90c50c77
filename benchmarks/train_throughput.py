"""Training throughput on the current device: tokens/s, ms/step, MFU and peak memory.

    python benchmarks/train_throughput.py                                   # CPU reference config
    python benchmarks/train_throughput.py --preset gpt2-124m --batch_size 16 --dtype bfloat16 --compile true

Runs the real train_step (model, fused AdamW, grad scaler, clipping) on random tokens,
after warm-up steps (and compilation), and times --steps steps with a device sync.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from gpt2repro.config import PRESETS, resolve
from gpt2repro.data import to_device
from gpt2repro.metrics import mfu, peak_flops
from gpt2repro.model import GPT
from gpt2repro.parallel import PTDTYPE
from gpt2repro.train import make_optimizer, make_scaler, model_config, resolve_dtype, train_step


class RandomTokens:
    """Stands in for ShardLoader: fresh random windows each micro-step, built on the host like the real one."""

    def __init__(self, batch_size: int, block_size: int, vocab_size: int, device: str):
        self.shape, self.vocab_size, self.device = (batch_size, block_size + 1), vocab_size, device
        self.pin = device.startswith("cuda")

    def batch(self, step: int, micro_step: int):
        rows = torch.randint(0, self.vocab_size, self.shape).numpy()
        return to_device(rows, self.device, self.pin)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--n_layer", type=int, default=None)
    p.add_argument("--n_head", type=int, default=None)
    p.add_argument("--n_embd", type=int, default=None)
    p.add_argument("--block_size", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=0.0)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if device == "cpu" and not overrides:  # the CPU reference: ~16M parameters, as nanoGPT's CPU runs
        overrides = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=8)
    cfg = PRESETS[args.preset].replace(**overrides, grad_accum_steps=1, total_batch_tokens=0, dtype=args.dtype)
    cfg = resolve(cfg, world_size=1)
    dtype = resolve_dtype(cfg, device)
    autocast = torch.autocast(device, dtype=PTDTYPE[dtype], enabled=dtype != "float32")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    raw = GPT(model_config(cfg)).to(device)
    compile_on = args.compile == "true" or (args.compile == "auto" and device == "cuda")
    model = torch.compile(raw) if compile_on else raw
    optimizer, scaler = make_optimizer(raw, cfg), make_scaler(dtype, device)
    loader = RandomTokens(cfg.batch_size, cfg.block_size, cfg.vocab_size, device)

    def run(n: int) -> None:
        for step in range(n):
            loss, _ = train_step(step, model, raw, optimizer, scaler, loader, cfg, autocast)
        loss.item()  # sync

    run(args.warmup)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run(args.steps)
    seconds = (time.perf_counter() - t0) / args.steps
    tokens_per_s = cfg.batch_size * cfg.block_size / seconds
    util = mfu(raw.flops_per_token(cfg.block_size), tokens_per_s, peak_flops(device, args.peak_tflops))
    if device == "cuda":
        memory = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        where = torch.cuda.get_device_name()
    else:
        memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        where = f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{where} | {raw.num_params():,} params, n_layer {cfg.n_layer} n_embd {cfg.n_embd} block {cfg.block_size} "
        f"batch {cfg.batch_size} | {dtype}, compile {compile_on}"
    )
    mfu_text = f"{100 * util:.1f}%" if util is not None else "n/a (no known peak; pass --peak_tflops)"
    print(f"{tokens_per_s:,.0f} tokens/s | {1000 * seconds:.0f} ms/step | MFU {mfu_text} | {memory}")


if __name__ == "__main__":
    from gpt2repro.runtime import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()  # as launch/train.py does
    main()
