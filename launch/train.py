"""Train GPT-2 on prepared shards: one process, torchrun on one node, or torchrun across nodes.

    python launch/train.py --config shakespeare-cpu --data data/shakespeare --out runs/shk
    torchrun --standalone --nproc_per_node=8 launch/train.py --config gpt2-124m --data data/owt --out runs/124m
    python launch/train.py --config gpt2-124m --data data/owt --out runs/x --batch_size=16 --max_steps 5000

--config takes a preset or a JSON file of fields; any field can be overridden with
--field value or --field=value. Rerunning the same command resumes from the newest
complete checkpoint in --out.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2repro import config as C  # noqa: E402
from gpt2repro import distributed as D  # noqa: E402
from gpt2repro.checkpoint import CheckpointError  # noqa: E402
from gpt2repro.shards import ShardError  # noqa: E402
from gpt2repro.train import TrainingError, fit, model_config  # noqa: E402


def parse(argv: list[str]) -> tuple[argparse.Namespace, C.TrainConfig]:
    fields = ", ".join(C.FIELD_TYPES)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"fields: {fields}; presets: {', '.join(C.PRESETS)}")  # fmt: skip
    p.add_argument("--config", required=True, help="preset name or JSON file")
    p.add_argument("--data", required=True, help="prepared dataset directory (data_prep/prepare.py)")
    p.add_argument("--out", required=True, help="run directory: config, metrics.jsonl, checkpoints")
    args, rest = p.parse_known_args(argv)
    return args, C.parse_overrides(C.load_base(args.config), rest)


def main(argv: list[str] | None = None) -> int:
    info = cfg = None
    try:
        args, cfg = parse(sys.argv[1:] if argv is None else argv)
        with D.distributed_context(cfg.device, cfg.collective_timeout_s) as info:
            cfg = C.resolve(cfg, info.world_size)
            if cfg.dry_run:
                if info.is_main:
                    from gpt2repro.model import GPT

                    n = GPT(model_config(cfg)).num_params()
                    tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * info.world_size
                    print(f"dry run: {n:,} parameters, {tokens:,} tokens per step, config {cfg.to_dict()}")
                return 0
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
    from gpt2repro.runtime import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()
    sys.exit(main())
