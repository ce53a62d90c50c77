"""A rank that stops answering inside a collective (run under torchrun by test_resilience.py)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from gpt2repro import distributed as D  # noqa: E402

timeout_s = float(sys.argv[1])
try:
    with D.distributed_context("cpu", timeout_s) as info:
        x = torch.ones(1)
        D.all_reduce_sum(x, info)  # everyone is alive
        if info.rank == 1:
            time.sleep(600)  # hung: never joins the next collective
        D.all_reduce_sum(x, info)
except RuntimeError as e:
    print(f"error: {D.hang_message(e, timeout_s) or e}", file=sys.stderr)
    sys.exit(1)
