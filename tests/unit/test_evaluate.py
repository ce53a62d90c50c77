"""Evaluation's own costs: HellaSwag on a model whose blocks are compiled in place (as under FSDP)."""

import torch

from gpt2repro import distributed as D
from gpt2repro import evaluate
from gpt2repro.model import GPT, GPTConfig


def test_hellaswag_on_compiled_blocks_compiles_nothing():
    # Rows of a new length each example: a compiled block would recompile for each (FSDP compiles blocks in place).
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    for block in model.transformer.h:
        block.compile(backend="eager")  # Dynamo traces as with inductor; the count is what matters here
    words = "the king went home and then she said over the hill".split()
    examples = [
        evaluate.HellaSwagExample(
            " ".join(words[: 2 + n]), tuple(" ".join(words[: k + n % 3]) for k in (1, 2, 3, 4)), 0
        )
        for n in range(8)
    ]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    scores = evaluate.hellaswag(model, examples, D.DistInfo())
    assert scores["num_examples"] == 8
    assert sum(torch._dynamo.utils.counters["frames"].values()) == 0, dict(torch._dynamo.utils.counters["frames"])
