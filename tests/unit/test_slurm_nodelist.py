"""expand_nodelist against the lists Slurm itself gives (`scontrol show hostnames`).

scontrol expands a host list from a throwaway slurm.conf alone (no daemon, no munge). Where it is
missing the comparison skips, except under CI (CI=true), where it fails: .ci/run installs it.
"""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2repro.slurm import expand_nodelist

EXPECTED = {
    "gpu07": ["gpu07"],
    "a,b": ["a", "b"],
    "b,a": ["b", "a"],  # Slurm's order, not sorted
    "a b": ["a", "b"],
    "a,,b": ["a", "b"],
    "a,": ["a"],
    "gpu[01-03,07]": ["gpu01", "gpu02", "gpu03", "gpu07"],
    "gpu[01-03,07],login1,n[8-10]": ["gpu01", "gpu02", "gpu03", "gpu07", "login1", "n8", "n9", "n10"],
    "a[1]": ["a1"],
    "a[01]": ["a01"],
    "x[0-0]": ["x0"],
    "a[9-10]": ["a9", "a10"],
    "a[08-11]": ["a08", "a09", "a10", "a11"],
    "a[001-3]": ["a001", "a002", "a003"],
    "a[1-010]": ["a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "a10"],  # lo sets the width
    "a[98-101]": ["a98", "a99", "a100", "a101"],
    "a[1,1]": ["a1", "a1"],
    "[1-2]": ["1", "2"],
    "n-[1-2]": ["n-1", "n-2"],
    "c457-[011-012]": ["c457-011", "c457-012"],
    "a-1.b": ["a-1.b"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
    "a[1-2][3-4]": ["a13", "a14", "a23", "a24"],
    "a[1,2]b[3,4]": ["a1b3", "a1b4", "a2b3", "a2b4"],
    "a[1-2]x[5],b": ["a1x5", "a2x5", "b"],
    "a[1-3]-[1-2],x[1-2]": ["a1-1", "a1-2", "a2-1", "a2-2", "a3-1", "a3-2", "x1", "x2"],
    # Three or more: the last bracket varies fastest, then the first, ..., the one before the last slowest.
    "r[1-2]c[07,10]n[1-2]": ["r1c07n1", "r1c07n2", "r2c07n1", "r2c07n2", "r1c10n1", "r1c10n2", "r2c10n1", "r2c10n2"],
    "a[1-3]b[1-2]c[5]": ["a1b1c5", "a2b1c5", "a3b1c5", "a1b2c5", "a2b2c5", "a3b2c5"],
    "a[1-2]b[1-2]c[1-2]d[1-2]": [f"a{a}b{b}c{c}d{d}" for c in "12" for b in "12" for a in "12" for d in "12"],
    "a[1-2],b[3-4]c[5]": ["a1", "a2", "b3c5", "b4c5"],
}

# Not host lists; scontrol rejects each of them too ("Invalid hostlist").
BAD = [
    "gpu[1-3]x",  # text after the last bracket (Slurm allows it only between brackets)
    "a[1-2]b[3-4]c",
    "node1.cluster.org,node[2-3].cluster",
    "a[]",
    "a[x-y]",
    "a[0x1]",
    "a[3-1]",
    "a[1--2]",
    "a[-1]",
    "a[1-2,]",
    "a[,1]",
    "a[1-3:2]",  # Slurm has no step syntax
    "a[0-10:5]",
    "a[1-2]]",
    "a[[1-2]]",
    "a[0-65536]",  # more than Slurm's 65536 hosts in one range
]
# Not host lists either; scontrol makes something of them ("a[1-2" -> "a]", "a[1-]" -> "a1", "" -> nothing)
# where we refuse them.
BAD_ELSEWHERE = ["a[1-2", "a]", "a[1-]", "a[ 1-2]", "", ",", " "]


@pytest.mark.parametrize("spec", EXPECTED)
def test_expected_lists(spec):
    assert expand_nodelist(spec) == EXPECTED[spec]


@pytest.mark.parametrize("spec", BAD + BAD_ELSEWHERE)
def test_bad_lists_are_one_clear_error(spec):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST") as e:
        expand_nodelist(spec)
    assert repr(spec) in str(e.value)


def test_node_py_names_a_bad_list_in_one_line():
    node_py = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "node.py"
    env = {**os.environ, "SLURM_JOB_NODELIST": "gpu[1-2]x"}
    out = subprocess.run([sys.executable, str(node_py), "--dry-run"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and not out.stdout
    assert out.stderr.splitlines() == [
        "error: SLURM_JOB_NODELIST 'gpu[1-2]x' is not a Slurm host list: 'gpu[1-2]x' has text after its last bracket."
    ]


def test_largest_range_slurm_takes():
    nodes = expand_nodelist("a[0-65535]")
    assert len(nodes) == 65536 and nodes[-1] == "a65535"


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory):
    """`scontrol show hostnames SPEC` -> (its node names, or None where it calls SPEC invalid)."""
    exe = shutil.which("scontrol")
    if exe is None:
        msg = "scontrol is not installed (apt-get install slurm-client)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{msg}; under CI this comparison must run (.ci/run installs it)")
        pytest.skip(msg)
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text("ClusterName=gpt2repro\nSlurmctldHost=localhost\n")  # all that expanding a list needs
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)  # must exist: scontrol retries a missing one for a minute

    def show_hostnames(spec: str) -> list[str] | None:
        out = subprocess.run([exe, "show", "hostnames", spec], capture_output=True, text=True, env=env, timeout=60)
        if "Invalid hostlist" in out.stderr:  # and still exits 0
            assert not out.stdout, out.stdout
            return None
        assert out.returncode == 0 and not out.stderr, out.stderr
        return out.stdout.split()

    return show_hostnames


def test_scontrol_works_from_this_config(scontrol):
    assert scontrol("rack[1-2]-n[01-02]") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]


@pytest.mark.parametrize("spec", EXPECTED)
def test_same_as_scontrol(scontrol, spec):
    assert expand_nodelist(spec) == scontrol(spec)


@pytest.mark.parametrize("spec", BAD)
def test_refused_where_scontrol_refuses(scontrol, spec):
    assert scontrol(spec) is None
    with pytest.raises(ValueError):
        expand_nodelist(spec)


def test_largest_range_same_as_scontrol(scontrol):
    assert expand_nodelist("a[0-65535]") == scontrol("a[0-65535]")


def _random_list(rng: random.Random) -> str:
    """A well-formed host list: names of 0-3 brackets, padded and unpadded ranges, text between brackets."""
    names = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["gpu", "n", "rack", "a-", "c457-", "x.y", ""])
        for b in range(rng.randint(0, 3)):
            items = []
            for _ in range(rng.randint(1, 3)):
                lo = rng.randint(0, 120)
                width = rng.choice([1, 2, 3])
                item = f"{lo:0{width}d}"
                if rng.random() < 0.6:
                    item += f"-{lo + rng.randint(0, 12)}"
                items.append(item)
            name += ("" if b == 0 else rng.choice(["", "-", "n", "-ib"])) + f"[{','.join(items)}]"
        names.append(name or "login1")
    return ",".join(names)


def test_random_lists_same_as_scontrol(scontrol):
    rng = random.Random(0)
    for _ in range(200):
        spec = _random_list(rng)
        assert expand_nodelist(spec) == scontrol(spec), spec
