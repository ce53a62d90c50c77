"""Training throughput: tokens/s, ms/step, MFU and peak memory (next to the planner's estimate).

    python benchmarks/train_throughput.py                                   # CPU reference config
    python benchmarks/train_throughput.py --preset gpt2-124m --batch_size 16 --dtype bfloat16 --compile true
    torchrun --standalone --nproc_per_node=8 benchmarks/train_throughput.py --preset gpt2-774m \
        --strategy fsdp --batch_size 8                                       # FSDP on one node

Runs the real train_step (model, fused AdamW, grad scaler, clipping; DDP or FSDP as
launch/train.py lays them out) on random tokens, after warm-up steps (and compilation),
and times --steps steps with a device sync. Under torchrun, tokens/s is for all ranks and
MFU and memory per GPU (the largest peak over the ranks).
"""

from __future__ import annotations

import argparse
import resource
import time

if __name__ == "__main__":  # before torch is imported, as launch/train.py does
    from gpt2repro.runtime import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()

import torch  # noqa: E402

from gpt2repro import distributed as D
from gpt2repro import parallel
from gpt2repro.config import PRESETS, resolve
from gpt2repro.data import to_device
from gpt2repro.memory import GiB
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
    p.add_argument("--grad_accum_steps", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", default="auto")
    p.add_argument("--strategy", default="auto", choices=("auto", "ddp", "fsdp"))
    p.add_argument("--activation_checkpointing", default="false", choices=("true", "false"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=0.0)
    args = p.parse_args()

    with D.distributed_context("auto") as info:
        overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if info.device_type == "cpu" and not overrides:  # the CPU reference: ~16M parameters, as nanoGPT's CPU runs
            overrides = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=8)
        cfg = PRESETS[args.preset].replace(
            **overrides, grad_accum_steps=args.grad_accum_steps, total_batch_tokens=0, dtype=args.dtype,
            strategy=args.strategy, activation_checkpointing=args.activation_checkpointing == "true",
        )  # fmt: skip
        benchmark(resolve(cfg, info.world_size), args, info)


def benchmark(cfg, args, info: D.DistInfo) -> None:
    device = info.device
    dtype = resolve_dtype(cfg, info.device_type)
    autocast = torch.autocast(info.device_type, dtype=PTDTYPE[dtype], enabled=dtype != "float32")
    if info.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    plan = parallel.plan(cfg, model_config(cfg), info.world_size, dtype, parallel.gpu_memory_bytes(cfg, device))

    torch.manual_seed(0)
    raw = GPT(model_config(cfg)).to(device)
    raw.activation_checkpointing = cfg.activation_checkpointing
    if plan.strategy == "fsdp":
        parallel.shard(raw, dtype)
    compile_on = args.compile == "true" or (args.compile == "auto" and info.device_type == "cuda")
    optimizer, scaler = make_optimizer(raw, cfg), make_scaler(dtype, info.device_type)
    model = parallel.wrap(raw, plan.strategy, info, compile_on)
    loader = RandomTokens(cfg.batch_size, cfg.block_size, cfg.vocab_size, device)

    def run(n: int) -> None:
        for step in range(n):
            loss, _ = train_step(step, model, raw, optimizer, scaler, loader, cfg, autocast)
        loss.item()  # sync

    run(args.warmup)
    if info.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    D.barrier(info)
    t0 = time.perf_counter()
    run(args.steps)
    D.barrier(info)
    seconds = (time.perf_counter() - t0) / args.steps
    tokens_per_s = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * info.world_size / seconds
    per_gpu = tokens_per_s / info.world_size
    util = mfu(raw.flops_per_token(cfg.block_size), per_gpu, peak_flops(device, args.peak_tflops, dtype))
    if info.device_type == "cuda":
        peak = D.all_reduce_max(torch.tensor(float(torch.cuda.max_memory_allocated()), device=device), info)
        memory = f"peak GPU memory {peak.item() / GiB:.2f} GiB (planner: {plan.total / GiB:.2f} GiB)"
        where = f"{info.world_size} x {torch.cuda.get_device_name()}"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        memory = f"peak RSS {rss / GiB:.2f} GiB (planner, tensors only: {plan.total / GiB:.2f} GiB)"
        where = f"{info.world_size} x CPU process, {torch.get_num_threads()} threads"
    if info.is_main:
        print(
            f"{where} | {plan.num_params:,} params, n_layer {cfg.n_layer} n_embd {cfg.n_embd} block {cfg.block_size} "
            f"micro-batch {cfg.batch_size} x accum {cfg.grad_accum_steps} | {dtype}, {plan.strategy}, compile "
            f"{compile_on}, activation checkpointing {cfg.activation_checkpointing}"
        )
        mfu_text = f"{100 * util:.1f}%" if util is not None else "n/a (no known peak; pass --peak_tflops)"
        print(f"{tokens_per_s:,.0f} tokens/s ({per_gpu:,.0f} per GPU) | {1000 * seconds:.0f} ms/step | "
              f"MFU {mfu_text} | {memory}")  # fmt: skip


if __name__ == "__main__":
    main()
