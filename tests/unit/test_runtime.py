import subprocess
import sys

import pytest


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tunables are Linux-only")
def test_reexec_sets_malloc_tunables_and_keeps_the_pid(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import os\n"
        "print('start', os.getpid(), os.environ.get('MALLOC_MMAP_THRESHOLD_'), flush=True)\n"
        "from gpt2repro.runtime import keep_freed_memory_in_heap\n"
        "keep_freed_memory_in_heap()\n"
        "print('after', os.getpid(), os.environ['MALLOC_TRIM_THRESHOLD_'])\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-u", str(script), "x"], capture_output=True, text=True, env=env, check=True)
    lines = [line.split() for line in out.stdout.splitlines()]
    assert [line[0] for line in lines] == ["start", "start", "after"]  # ran once more, then went on
    assert lines[0][1] == lines[1][1] == lines[2][1]  # same process
    assert lines[0][2] == "None" and lines[1][2] == lines[2][2] == str(1 << 34)
