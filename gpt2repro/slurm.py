"""Slurm: from the job's environment to one torchrun command per node (no torch here).

The first node of SLURM_JOB_NODELIST hosts the c10d rendezvous; every node runs one
torchrun agent with G workers. Under fault tolerance (FT=1) each node is a replica group of its
own instead: a torchrun of its own, the groups meeting at a torchft lighthouse (gpt2repro/ft.py).
Expanding the compact node list ("gpu[01-03,07]") is done here so that the commands can be printed
and tested without Slurm; it gives what `scontrol show hostnames` gives (tests/unit/test_slurm_nodelist.py
checks it against scontrol).
"""

from __future__ import annotations

import itertools
import re

# Slurm refuses a bracket range of more hosts than this ("Too many hosts in range").
MAX_RANGE = 64 * 1024

_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def expand_nodelist(spec: str) -> list[str]:
    """A Slurm host list -> its node names, in Slurm's order (as `scontrol show hostnames`).

        'a,gpu[01-03,07],b'    -> ['a', 'gpu01', 'gpu02', 'gpu03', 'gpu07', 'b']
        'rack[1-2]-n[01-02]'   -> ['rack1-n01', 'rack1-n02', 'rack2-n01', 'rack2-n02']

    Names are separated by commas (or whitespace) outside brackets. A bracket holds numbers and
    lo-hi ranges separated by commas; a number is zero-padded to the width of its range's `lo`.
    Several brackets in one name expand as a cartesian product in Slurm's order (see _expand_name); text
    may stand between brackets but, as in Slurm, not after the last one. Slurm has no step syntax
    ("[1-9:2]"). Anything else is a ValueError naming the list.
    """
    nodes = []
    for name in _split_names(spec):
        nodes.extend(_expand_name(spec, name))
    if not nodes:
        raise ValueError(f"SLURM_JOB_NODELIST {spec!r} names no nodes.")
    return nodes


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"SLURM_JOB_NODELIST {spec!r} is not a Slurm host list: {why}.")


def _split_names(spec: str) -> list[str]:
    """Split at commas and whitespace outside brackets; brackets must pair up and not nest."""
    names, current, depth = [], [], 0
    for ch in spec:
        if ch == "[":
            if depth:
                raise _bad(spec, "a '[' inside brackets")
            depth = 1
        elif ch == "]":
            if not depth:
                raise _bad(spec, "a ']' without its '['")
            depth = 0
        elif not depth and (ch == "," or ch.isspace()):
            names.append("".join(current))
            current = []
            continue
        current.append(ch)
    if depth:
        raise _bad(spec, "a '[' without its ']'")
    names.append("".join(current))
    return [name for name in names if name]  # Slurm skips empty names ("a,,b")


def _expand_name(spec: str, name: str) -> list[str]:
    # "rack[1-2]-n[01-02]" -> texts ["rack", "-n", ""] around brackets ["1-2", "01-02"]
    parts = re.split(r"\[([^\]]*)\]", name)
    texts, brackets = parts[0::2], parts[1::2]
    if not brackets:
        return [name]
    if texts[-1]:
        raise _bad(spec, f"{name!r} has text after its last bracket")
    numbers = [_expand_bracket(spec, bracket) for bracket in brackets]
    # Slurm's loops: the last bracket varies fastest, the others nest the other way round, the one
    # before the last slowest: "a[1-2]b[1-2]c[1-2]" -> a1b1c1 a1b1c2 a2b1c1 a2b1c2 a1b2c1 ...
    # With two brackets that is the plain cartesian product ("rack[1-2]-n[01-02]": rack1-n01, rack1-n02 ...).
    order = [*range(len(brackets) - 2, -1, -1), len(brackets) - 1]
    names = []
    for picked in itertools.product(*(numbers[i] for i in order)):
        number_of = dict(zip(order, picked, strict=True))
        names.append("".join(text + number_of[i] for i, text in enumerate(texts[:-1])))
    return names


def _expand_bracket(spec: str, bracket: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']."""
    numbers = []
    for item in bracket.split(","):
        m = _RANGE.fullmatch(item)
        if not m:
            raise _bad(spec, f"[{bracket}] holds {item!r}, not a number or a lo-hi range")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise _bad(spec, f"the range {item!r} runs backwards")
        if int(hi) - int(lo) + 1 > MAX_RANGE:
            raise _bad(spec, f"the range {item!r} has more than {MAX_RANGE} hosts (Slurm's limit)")
        numbers.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return numbers


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


def ft_group_command(
    group: int, groups: int, gpus_per_node: int, lighthouse: str, train_args: list[str], max_restarts: int = 3
) -> list[str]:
    """Under fault tolerance (FT=1 in train.sbatch): one node's torchrun as replica group `group` of `groups`, a job
    of its own (a rendezvous on the node), meeting the others through the torchft lighthouse. Its workers that fail
    are restarted by torchrun and heal from the other groups."""
    return [
        "torchrun",
        "--standalone",
        f"--nproc_per_node={gpus_per_node}",
        f"--max-restarts={max_restarts}",
        "launch/train.py",
        *train_args,
        "--ft_groups",
        str(groups),
        "--ft_group",
        str(group),
        "--ft_lighthouse",
        lighthouse,
    ]
