"""Run by `srun` once per node from train.sbatch: becomes this node's torchrun agent.

    python launch/slurm/node.py --config gpt2-124m --data DIR --out RUN_DIR       (inside a Slurm job)
    python launch/slurm/node.py --dry-run --config ...                           (prints every node's command)
    python launch/slurm/node.py --ft-group I --ft-lighthouse HOST:PORT ...        (FT=1: node I, a replica group)

Reads SLURM_JOB_NODELIST and SLURM_JOB_ID; GPUS_PER_NODE (default 8),
RDZV_PORT (29500) and MAX_RESTARTS (3) from the environment.
"""

import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt2repro.slurm import expand_nodelist, ft_group_command, torchrun_command  # noqa: E402


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


def take_option(argv: list[str], name: str) -> str | None:
    """The value of this script's own `name VALUE` in argv, removed from it (None: not there)."""
    if name not in argv:
        return None
    i = argv.index(name)
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    train_args = [a for a in argv if a != "--dry-run"]
    ft_group, lighthouse = take_option(train_args, "--ft-group"), take_option(train_args, "--ft-lighthouse")
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
    if lighthouse is not None:  # FT=1: every node a replica group, I this one
        gpus, restarts = options["gpus_per_node"], options["max_restarts"]
        commands = {
            node: ft_group_command(i, len(nodes), gpus, lighthouse, train_args, restarts)
            for i, node in enumerate(nodes)
        }
    else:
        commands = {node: torchrun_command(nodes, train_args=train_args, **options) for node in nodes}
    if dry_run:
        for node, cmd in commands.items():
            print(f"{node}: {shlex.join(cmd)}")
        return 0
    if ft_group is not None:
        return run_torchrun(commands[nodes[int(ft_group)]])
    return run_torchrun(commands[nodes[0]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
