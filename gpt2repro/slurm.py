"""Slurm: from the job's environment to one torchrun command per node (no torch here).

The first node of SLURM_JOB_NODELIST hosts the c10d rendezvous; every node runs one
torchrun agent with G workers. Expanding the compact node list ("gpu[01-03,07]") is done
here so that the commands can be printed and tested without Slurm.
"""

from __future__ import annotations

import re


def expand_nodelist(spec: str) -> list[str]:
    """'a,gpu[01-03,07],b' -> ['a', 'gpu01', 'gpu02', 'gpu03', 'gpu07', 'b'] (as `scontrol show hostnames`)."""
    nodes = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", spec):
        if plain:
            nodes.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                nodes.append(f"{prefix}{n:0{len(lo)}d}")
    if not nodes:
        raise ValueError(f"SLURM_JOB_NODELIST {spec!r} names no nodes.")
    return nodes


def torchrun_command(
    nodes: list[str],
    gpus_per_node: int,
    job_id: str,
    train_args: list[str],
    port: int = 29500,
    max_restarts: int = 3,
) -> list[str]:
    """The same command on every node: the c10d rendezvous assigns the node ranks (torchrun warns that
    --node-rank is ignored with it)."""
    return [
        "torchrun",
        f"--nnodes={len(nodes)}",
        f"--nproc_per_node={gpus_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={nodes[0]}:{port}",
        f"--rdzv-id={job_id}",
        f"--max-restarts={max_restarts}",
        "launch/train.py",
        *train_args,
    ]
