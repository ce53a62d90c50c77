"""Run by train.sbatch under FT=1, on the job's first node: every node a replica group (gpt2repro/ft.py).

    python launch/slurm/ft_job.py --lighthouse HOST:PORT [--port PORT] -- TRAIN_ARGS...

Starts the torchft lighthouse here (unless FT_LIGHTHOUSE named one elsewhere: --port 0), then one Slurm job step
per node, each that node's torchrun as its replica group (launch/slurm/node.py --ft-group I). A group whose step
ends in failure (the node's processes killed, a worker that torchrun gave up on) is started again on its node, at
most MAX_GROUP_RESTARTS times (default 3) each; it heals from the live groups, which never stopped. The job ends
when every group has finished. SIGUSR1 (Slurm's warning before the time limit) checkpoints every group and
requeues the job, as without fault tolerance; SIGTERM (a requeue, a cancel) lets the groups checkpoint and stop.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt2repro.slurm import expand_nodelist  # noqa: E402

RESTART_DELAY_S = 2.0


class Groups:
    """The replica groups' job steps, started and restarted."""

    def __init__(self, nodes: list[str], lighthouse: str, train_args: list[str], max_restarts: int):
        self.nodes, self.lighthouse, self.train_args, self.max_restarts = nodes, lighthouse, train_args, max_restarts
        self.steps: dict[int, subprocess.Popen] = {}
        self.restarts = dict.fromkeys(range(len(nodes)), 0)
        self.ended: dict[int, int] = {}  # group -> its last exit status
        self.stopping = False

    def start(self, group: int) -> None:
        cmd = [
            "srun",
            "--nodes=1",
            "--ntasks=1",
            f"--nodelist={self.nodes[group]}",
            "--kill-on-bad-exit=1",
            "python",
            "launch/slurm/node.py",
            "--ft-group",
            str(group),
            "--ft-lighthouse",
            self.lighthouse,
            *self.train_args,
        ]
        self.steps[group] = subprocess.Popen(cmd)

    def watch(self) -> int:
        """Until every group has ended: restart the lost ones. 0 when all finished, else 1."""
        for group in range(len(self.nodes)):
            self.start(group)
        while self.steps:
            time.sleep(0.5)
            for group, step in list(self.steps.items()):
                status = step.poll()
                if status is None:
                    continue
                del self.steps[group]
                if status == 0 or self.stopping:
                    self.ended[group] = status
                    continue
                node = self.nodes[group]
                if self.restarts[group] >= self.max_restarts:
                    print(
                        f"error: replica group {group} (node {node}) was lost again (exit {status}) after "
                        f"{self.restarts[group]} restart(s) (MAX_GROUP_RESTARTS={self.max_restarts}); the others go "
                        "on without it",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.ended[group] = status
                    continue
                self.restarts[group] += 1
                print(
                    f"replica group {group} (node {node}) was lost (exit {status}); starting it again "
                    f"({self.restarts[group]} of {self.max_restarts}): it heals from the live groups",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(RESTART_DELAY_S)
                self.start(group)
        return 0 if all(status == 0 for status in self.ended.values()) else 1


def main(argv: list[str]) -> int:
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lighthouse", required=True, help="HOST:PORT every group meets at")
    parser.add_argument("--port", type=int, default=29510, help="start the lighthouse here on this port (0: do not)")
    args = parser.parse_args(ours)
    nodes = expand_nodelist(os.environ["SLURM_JOB_NODELIST"])
    job = os.environ.get("SLURM_JOB_ID", "")
    lighthouse = None
    if args.port:
        quiet = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}  # not a line per quorum
        cmd = ["torchft_lighthouse", "--min_replicas", "1", "--bind", f"[::]:{args.port}"]
        lighthouse = subprocess.Popen(cmd, env=quiet)
    groups = Groups(nodes, args.lighthouse, train_args, int(os.environ.get("MAX_GROUP_RESTARTS", "3")))
    requeue = []

    def on_signal(signum, frame):
        groups.stopping = True
        if signum == signal.SIGUSR1 and job:  # the time limit is near: every group checkpoints, then requeue
            print(f"{time.ctime()}: time limit near: checkpointing, then requeueing job {job}", flush=True)
            subprocess.run(["scancel", "--signal=TERM", job], check=False)
            requeue.append(job)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        status = groups.watch()
    finally:
        if lighthouse is not None:
            lighthouse.terminate()
            lighthouse.wait()
    if requeue:
        subprocess.run(["scontrol", "requeue", job], check=False)
        return 0
    return 143 if groups.stopping else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
