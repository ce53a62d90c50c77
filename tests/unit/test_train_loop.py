"""The training loop's host traffic: what a step reads back from the device when nothing is logged."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gpt2repro import config as C
from gpt2repro import distributed as D
from gpt2repro import metrics, train
from gpt2repro.presets import PRESETS

# Each of these copies a value from the device to the host and waits for it: a host sync on a GPU.
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__}


class HostReads(TorchFunctionMode):
    """Records each host read outside train_step, and a marker at each train_step."""

    def __init__(self):
        super().__init__()
        self.log, self.paused = [], False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused and func in READS:
            self.log.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spike_zscore", [8.0, 0.0])
def test_between_log_steps_a_step_reads_the_stop_vote_and_the_guards_verdict_only(
    shakespeare_data, tmp_path, monkeypatch, spike_zscore
):
    """The stop vote of the step before (one step old: the GPU queue never runs dry), and with the spike guard on
    (the default) its verdict on this step: one read of two flags, which decides whether the step counts."""
    reads = HostReads()
    real_step = train.train_step

    def marked_step(*args, **kwargs):  # the step's own reads (the CPU-only token id check) are not the loop's
        reads.log.append("step")
        reads.paused = True
        try:
            return real_step(*args, **kwargs)
        finally:
            reads.paused = False

    monkeypatch.setattr(train, "train_step", marked_step)
    base = PRESETS["shakespeare-cpu"].replace(
        n_layer=1,
        n_head=1,
        n_embd=16,
        block_size=16,
        batch_size=2,
        max_steps=8,
        log_interval=1000,
        eval_interval=1000,
        ckpt_interval=1000,
        eval_tokens=64,
        device="cpu",
        spike_zscore=spike_zscore,
    )
    with reads:
        train.fit(C.resolve(base, 1), str(shakespeare_data), tmp_path / "run", D.DistInfo())
    after_step = " ".join(reads.log).split("step")[1:]  # what the loop read after each step
    assert len(after_step) == 8
    verdict = ["tolist"] if spike_zscore else []
    assert after_step[0].split() == verdict  # no stop vote to read yet
    for k in range(1, 7):  # the loss and the rest only at log steps
        assert after_step[k].split() == ["tolist", *verdict], (k + 1, after_step[k])


def test_throughput_leaves_the_first_step_out_and_the_eta_counts_eval_time_at_its_share(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    throughput = metrics.Throughput(step=0)
    clock[0] = 100.0  # the first step: 100 s of compilation
    throughput.restart(1)
    clock[0] = 115.0  # steps 2-11: 10 s of training and a 5 s eval
    throughput.pause(5.0)
    assert throughput.close(11) == (10.0, 10)  # 1 s per training step
    assert throughput.eta_s(100) == 150.0  # 100 steps, and evals at the share they took so far
