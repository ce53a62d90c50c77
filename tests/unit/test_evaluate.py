"""Evaluation's own costs and numerics: HellaSwag on a model whose blocks are compiled in place (as under FSDP),
and under the run's autocast."""

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2repro import distributed as D
from gpt2repro import evaluate, evaluator
from gpt2repro.config import TrainConfig
from gpt2repro.model import GPT, GPTConfig
from gpt2repro.parallel import Layout

WORDS = "the king went home and then she said over the hill".split()
EXAMPLES = [
    evaluate.HellaSwagExample(" ".join(WORDS[: 2 + n]), tuple(" ".join(WORDS[: k + n % 3]) for k in (1, 2, 3, 4)), 0)
    for n in range(8)
]


def test_hellaswag_on_compiled_blocks_compiles_nothing():
    # Rows of a new length each example: a compiled block would recompile for each (FSDP compiles blocks in place).
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    for block in model.transformer.h:
        block.compile(backend="eager")  # Dynamo traces as with inductor; the count is what matters here
    examples = EXAMPLES
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    scores = evaluate.hellaswag(model, examples, Layout(D.DistInfo()), contextlib.nullcontext())
    assert scores["num_examples"] == 8
    assert sum(torch._dynamo.utils.counters["frames"].values()) == 0, dict(torch._dynamo.utils.counters["frames"])


class MatmulDtypes(TorchDispatchMode):
    """The input dtypes of every matmul that runs inside it (after autocast has cast them)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.add(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def test_hellaswag_in_an_evaluation_runs_under_the_runs_autocast(monkeypatch):
    # A bfloat16 run's HellaSwag scores bfloat16 matmuls, as its val loss does (FSDP's gathered weights are
    # 16-bit; without the autocast DDP's fp32 weights would score in fp32 instead).
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    cfg = TrainConfig(batch_size=2)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    in_loop = evaluator.Evaluator(cfg, None, EXAMPLES, model, model, Layout(D.DistInfo()), autocast)
    monkeypatch.setattr(evaluate, "val_loss", lambda *args: 0.0)  # HellaSwag's matmuls alone
    with MatmulDtypes() as dtypes:
        results = in_loop(1)
    assert dtypes.seen == {torch.bfloat16}
    assert 0 <= results["hellaswag_acc_norm"] <= 1
