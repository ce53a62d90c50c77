"""Train GPT-2 on prepared shards: one process, torchrun on one node, or torchrun across nodes.

    python launch/train.py --config shakespeare-cpu --data data/shakespeare --out runs/shk
    torchrun --standalone --nproc_per_node=8 launch/train.py --config gpt2-124m --data data/owt --out runs/124m

--help lists every flag with its type, default and meaning (gpt2repro/cli.py builds them from the config;
docs/flags.md is the same list). Rerunning the same command resumes from the newest complete checkpoint in --out.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2repro.runtime import keep_freed_memory_in_heap, require_torch  # noqa: E402

require_torch()  # one clear line on a torch older than the package needs, before anything imports it
if __name__ == "__main__":  # before torch is imported: the re-exec would otherwise import it twice
    keep_freed_memory_in_heap()

from gpt2repro import cli, tune  # noqa: E402
from gpt2repro import distributed as D  # noqa: E402
from gpt2repro.checkpoint import CheckpointError  # noqa: E402
from gpt2repro.distributed import ClusterSettings  # noqa: E402
from gpt2repro.errors import failure_message, out_of_memory_message, print_error  # noqa: E402
from gpt2repro.metrics import STARTUP  # noqa: E402
from gpt2repro.profiling import memory_snapshot_on_oom  # noqa: E402
from gpt2repro.settings import Machine, dry_run  # noqa: E402
from gpt2repro.shards import ShardError  # noqa: E402
from gpt2repro.train import TrainingError, fit  # noqa: E402
from gpt2repro.weights import with_source_shape  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    STARTUP.mark("imports")
    info = asked = None
    try:
        args, asked, given = cli.parse(sys.argv[1:] if argv is None else argv)
        with D.distributed_context(asked.device, asked.collective_timeout_s) as info:
            STARTUP.mark("rendezvous")
            if asked.init_from:  # the network's shape is the source's (read by rank 0 alone)
                asked = with_source_shape(asked, given, info)
            if asked.dry_run:
                if info.is_main:
                    world_size = args.world_size or info.world_size
                    # Planning another world size: one node of it, unless told otherwise.
                    per_node = args.gpus_per_node or (world_size if args.world_size else info.local_world_size)
                    here = Machine.this(info.device, info.world_size, info.local_world_size)
                    print(dry_run(asked, given, Machine.planned(world_size, per_node, asked.gpu_memory_gb, here)))
                return 0
            if asked.tune:  # time the layouts that may fit, forecast the run, train nothing
                tune.tune(asked, given, args.data, args.out, info, sys.argv[1:] if argv is None else argv)
                return 0
            with memory_snapshot_on_oom(args.out, info):
                fit(asked, args.data, args.out, info, given)  # returns early, after a checkpoint, on SIGTERM/SIGUSR1
        return 0
    except (ValueError, ImportError, TrainingError, CheckpointError, ShardError) as e:
        print_error(e, info)  # from every rank that fails, not only rank 0
        return 1
    except (RuntimeError, MemoryError) as e:
        timeout_s = asked.collective_timeout_s if asked else ClusterSettings.collective_timeout_s
        message = out_of_memory_message(e) or failure_message(e, D.backend_timeout_s(timeout_s))
        if message is None:
            raise
        print_error(message, info)
        return 1


if __name__ == "__main__":
    sys.exit(main())
