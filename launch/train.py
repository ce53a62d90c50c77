"""Train GPT-2 on prepared shards: one process, torchrun on one node, or torchrun across nodes.

    python launch/train.py --config shakespeare-cpu --data data/shakespeare --out runs/shk
    torchrun --standalone --nproc_per_node=8 launch/train.py --config gpt2-124m --data data/owt --out runs/124m
    python launch/train.py --config gpt2-124m --data data/owt --out runs/x --batch_size=16 --max_steps 5000
    python launch/train.py --config gpt2-1558m --dry_run true --world_size 8 --gpu_memory_gb 40   (memory plan)

--config takes a preset or a JSON file of fields; any field can be overridden with
--field value or --field=value. Rerunning the same command resumes from the newest
complete checkpoint in --out.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # before torch is imported: the re-exec would otherwise import it twice
    from gpt2repro.runtime import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()

from gpt2repro import config as C  # noqa: E402
from gpt2repro import distributed as D  # noqa: E402
from gpt2repro.checkpoint import CheckpointError  # noqa: E402
from gpt2repro.memory import format_plan  # noqa: E402
from gpt2repro.parallel import gpu_memory_bytes  # noqa: E402
from gpt2repro.parallel import plan as parallel_plan  # noqa: E402
from gpt2repro.shards import ShardError  # noqa: E402
from gpt2repro.train import TrainingError, fit, model_config  # noqa: E402


def parse(argv: list[str]) -> tuple[argparse.Namespace, C.TrainConfig]:
    fields = ", ".join(C.FIELD_TYPES)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"fields: {fields}; presets: {', '.join(C.PRESETS)}")  # fmt: skip
    p.add_argument("--config", required=True, help="preset name or JSON file")
    p.add_argument("--data", help="prepared dataset directory (data_prep/prepare.py)")
    p.add_argument("--out", help="run directory: config, metrics.jsonl, checkpoints")
    p.add_argument("--world_size", type=int, default=0,
                   help="with --dry_run true: plan for this many GPUs (default: this launch's ranks)")  # fmt: skip
    args, rest = p.parse_known_args(argv)
    cfg = C.parse_overrides(C.load_base(args.config), rest)
    if not cfg.dry_run and not (args.data and args.out):
        p.error("--data and --out are required (except with --dry_run true)")
    return args, cfg


def dry_run(cfg: C.TrainConfig, world_size: int, device: str) -> str:
    """The memory plan of this configuration on world_size GPUs; nothing is allocated."""
    cfg = C.resolve(cfg, world_size)
    gpu_bytes = gpu_memory_bytes(cfg, device)
    dtype = cfg.dtype
    if dtype == "auto":  # as the run would pick it on a GPU
        dtype = "bfloat16" if gpu_bytes else "float32"
    plan = parallel_plan(cfg, model_config(cfg), world_size, dtype, gpu_bytes)
    tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * world_size
    strategy = f"strategy {cfg.strategy}" + (f" -> {plan.strategy}" if cfg.strategy == "auto" else "")
    return f"dry run: {strategy}, {tokens:,} tokens per optimizer step, nothing trained\n{format_plan(plan, gpu_bytes)}"


def main(argv: list[str] | None = None) -> int:
    info = cfg = None
    try:
        args, cfg = parse(sys.argv[1:] if argv is None else argv)
        with D.distributed_context(cfg.device, cfg.collective_timeout_s) as info:
            if cfg.dry_run:
                if info.is_main:
                    print(dry_run(cfg, args.world_size or info.world_size, info.device))
                return 0
            cfg = C.resolve(cfg, info.world_size)
            fit(cfg, args.data, args.out, info)  # also returns early, after a checkpoint, on SIGTERM/SIGUSR1
        return 0
    except (ValueError, TrainingError, CheckpointError, ShardError) as e:
        if info is None or info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        message = D.hang_message(e, cfg.collective_timeout_s) if cfg else None
        if message is None:
            raise
        print(f"error: rank {info.rank if info else '?'}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
