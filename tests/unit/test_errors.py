"""The one-line messages for distributed failures: a hang, a lost peer, NCCL failing by itself."""

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from gpt2repro.errors import failure_message

# NCCL's words as torch raises them (ProcessGroupNCCL: "NCCL error in: FILE:LINE, <ncclGetErrorString>, NCCL
# version V", then the ncclResult's name and description, then NCCL's last error), as DistBackendError.
NCCL_BAD_INTERFACE = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, unhandled system error (run "
    "with NCCL_DEBUG=INFO for details), NCCL version 2.21.5\nncclSystemError: System call (e.g. socket, malloc) or "
    "external library call failed or device error. \nLast error:\nsocketStartConnect: Connect to 10.0.0.2<45678> "
    "failed : Software caused connection abort"
)
NCCL_INTERNAL = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, internal error - please report this "
    "issue to the NCCL developers, NCCL version 2.21.5\nncclInternalError: Internal check failed.\nLast error:\n"
    "NET/IB : Got completion from peer 10.0.0.3<39044> with status=12 opcode=0 len=0 vendor err 129"
)
NCCL_CONNECT_TIMED_OUT = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, remote process exited or there "
    "was a network error, NCCL version 2.21.5\nncclSystemError: System call (e.g. socket, malloc) or external library "
    "call failed or device error. \nLast error:\nsocketPollConnect: Connect to 172.17.0.3<40245> returned "
    "110(Connection timed out)"
)
NCCL_WATCHDOG_TIMEOUT = (
    "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1021, OpType=ALLREDUCE, NumelIn=1, "
    "NumelOut=1, Timeout(ms)=2000000) ran for 2000134 milliseconds before timing out."
)
NCCL_REMOTE = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:2046, remote process exited or there "
    "was a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or a "
    "remote process exiting prematurely."
)


@pytest.mark.parametrize("text", [NCCL_BAD_INTERFACE, NCCL_INTERNAL, NCCL_CONNECT_TIMED_OUT])
def test_an_nccl_error_says_what_nccl_said_and_names_the_fixes_not_a_hang(text):
    message = failure_message(dist.DistBackendError(text), 2000.0)
    assert message.startswith("NCCL failed: NCCL error in: ") and "\n" not in message
    assert "collective did not complete" not in message  # it is no hang: a restart meets the same error
    nccl_result = text.splitlines()[1].split(":")[0]
    assert nccl_result in message and text.splitlines()[-1] in message  # its error name and its last error
    for fix in ("NCCL_DEBUG=INFO", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE=1"):
        assert fix in message


def test_nccls_watchdog_timeout_and_a_remote_failure_keep_their_sentences():
    assert "a collective did not complete within the process group's timeout (2000 s)" in failure_message(
        dist.DistBackendError(NCCL_WATCHDOG_TIMEOUT), 2000.0
    )
    assert failure_message(dist.DistBackendError(NCCL_REMOTE), 2000.0).startswith("lost contact with another rank")


def test_a_real_gloo_timeout_is_a_hang():
    # Two ranks of a real gloo group in one process: rank 1 never joins the all-reduce, rank 0 times out.
    store, groups = dist.HashStore(), [None, None]

    def join(rank: int) -> None:
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=1))

    threads = [threading.Thread(target=join, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with pytest.raises(RuntimeError) as caught:
        groups[0].allreduce([torch.ones(1)]).wait()
    message = failure_message(caught.value, 1.0)
    assert message.startswith("a collective did not complete within the process group's timeout (1 s)")
    assert "Timed out waiting" in message


def test_errors_of_the_users_own_making_are_left_to_their_own_lines():
    assert failure_message(ValueError("timed out"), 1.0) is None
    assert failure_message(RuntimeError("shape mismatch"), 1.0) is None
