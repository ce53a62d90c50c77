"""Run by `srun` once per node from train.sbatch: becomes this node's torchrun agent.

    python launch/slurm/node.py --config gpt2-124m --data DIR --out RUN_DIR       (inside a Slurm job)
    python launch/slurm/node.py --dry-run --config ...                           (prints every node's command)

Reads SLURM_JOB_NODELIST, SLURM_NODEID and SLURM_JOB_ID; GPUS_PER_NODE (default 8),
RDZV_PORT (29500) and MAX_RESTARTS (3) from the environment.
"""

import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt2repro.slurm import expand_nodelist, torchrun_command  # noqa: E402


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    train_args = [a for a in argv if a != "--dry-run"]
    try:
        nodes = expand_nodelist(os.environ["SLURM_JOB_NODELIST"])
    except KeyError:
        print("error: SLURM_JOB_NODELIST is not set; run inside a Slurm job, or set it for --dry-run.", file=sys.stderr)
        return 1
    options = dict(
        gpus_per_node=int(os.environ.get("GPUS_PER_NODE", "8")),
        job_id=os.environ.get("SLURM_JOB_ID", "gpt2repro"),
        port=int(os.environ.get("RDZV_PORT", "29500")),
        max_restarts=int(os.environ.get("MAX_RESTARTS", "3")),
    )
    if dry_run:
        for rank, node in enumerate(nodes):
            print(f"{node}: {shlex.join(torchrun_command(nodes, rank, train_args=train_args, **options))}")
        return 0
    cmd = torchrun_command(nodes, int(os.environ["SLURM_NODEID"]), train_args=train_args, **options)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
