"""Run by `srun` once per node from train.sbatch: becomes this node's torchrun agent.

    python launch/slurm/node.py --config gpt2-124m --data DIR --out RUN_DIR       (inside a Slurm job)
    python launch/slurm/node.py --dry-run --config ...                           (prints every node's command)

Reads SLURM_JOB_NODELIST and SLURM_JOB_ID; GPUS_PER_NODE (default 8),
RDZV_PORT (29500) and MAX_RESTARTS (3) from the environment.
"""

import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt2repro.slurm import expand_nodelist, torchrun_command  # noqa: E402


def run_torchrun(cmd: list[str]) -> int:
    """torchrun's own agent, in this process. A clean stop (Slurm's SIGTERM on requeue or time limit,
    after which the workers checkpoint) ends in one line, not torchrun's SignalException traceback;
    failed workers in torchrun's summary of them, without the agent's traceback below it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    node = os.environ.get("SLURMD_NODENAME", "this node")
    try:
        run(get_args_parser().parse_args(cmd[1:]))
    except SignalException as e:
        print(f"{node}: torchrun stopped on {e.sigval.name} (its workers checkpoint first)", file=sys.stderr)
        return 128 + e.sigval
    except ChildFailedError as e:
        print(f"{node}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    train_args = [a for a in argv if a != "--dry-run"]
    try:
        nodes = expand_nodelist(os.environ["SLURM_JOB_NODELIST"])
    except KeyError:
        print("error: SLURM_JOB_NODELIST is not set; run inside a Slurm job, or set it for --dry-run.", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    options = dict(
        gpus_per_node=int(os.environ.get("GPUS_PER_NODE", "8")),
        job_id=os.environ.get("SLURM_JOB_ID", "gpt2repro"),
        port=int(os.environ.get("RDZV_PORT", "29500")),
        max_restarts=int(os.environ.get("MAX_RESTARTS", "3")),
    )
    if dry_run:
        for node in nodes:
            print(f"{node}: {shlex.join(torchrun_command(nodes, train_args=train_args, **options))}")
        return 0
    return run_torchrun(torchrun_command(nodes, train_args=train_args, **options))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
