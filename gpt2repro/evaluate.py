"""Evaluation: loss over fixed val windows, HellaSwag, and the settings of evaluation during training.

The val loss here is the trainer's val_loss (same windows, same reduction), so evaluating
a checkpoint reproduces the val_loss logged at its step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from gpt2repro import distributed as D
from gpt2repro.data import EvalWindows
from gpt2repro.schema import Settings, setting


@dataclass(frozen=True)
class EvalSettings(Settings):
    """The val loss every eval_interval steps and at the last; HellaSwag and lm-eval tasks (gpt2repro/harness.py,
    needs gpt2repro[eval]) beside it; and the reference curve each evaluation is judged by."""

    TITLE = "evaluation and references"

    eval_interval: int = setting(1000, "evaluate every this many steps, and at the last", resumable=True, at_least=1)
    eval_tokens: int = setting(
        10_485_760, "val tokens per evaluation (10 x 2**20: 10,240 windows of 1024)", resumable=True
    )
    hellaswag_file: str = setting("", "HellaSwag's jsonl: its accuracy at each evaluation", resumable=True)
    eval_tasks: str = setting("", "lm-eval tasks, comma-separated (e.g. hellaswag,lambada_openai)", resumable=True)
    eval_task_data: str = setting("", "local data files for them, TASK=FILE,... (else the Hub's)", resumable=True)
    eval_tasks_limit: int = setting(
        500, "the first this many documents of each task (0: all)", resumable=True, at_least=0
    )
    eval_tasks_at: str = setting(
        "end", "run the tasks at every evaluation or at the last step only", resumable=True, choices=("eval", "end")
    )
    reference: str = setting(
        "", "a val curve (gpt2repro/references.py) or a run directory each evaluation is judged by", resumable=True
    )

    def problems(self) -> list[str]:
        if self.eval_tokens < self.block_size:
            return [f"eval_tokens ({self.eval_tokens}) must be at least block_size ({self.block_size})"]
        return []


@torch.no_grad()
def val_loss(model, windows: EvalWindows, batch_size: int, layout, autocast) -> float:
    """Mean loss over the fixed eval windows, split across the data-parallel replicas (a parallel.Layout)."""
    info = layout.info
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # (sum of window losses, windows)
    mine = windows.batches(batch_size, layout.dp_rank, layout.dp_size, info.device)
    # An FSDP model gathers its parameters in every forward, so every rank runs the same number
    # of them: a rank with fewer windows repeats one, with weight 0.
    most = math.ceil(math.ceil(len(windows) / layout.dp_size) / batch_size)
    for _ in range(most):
        batch = next(mine, None)
        x, y = batch if batch is not None else next(windows.batches(1, 0, 1, info.device))
        with autocast:
            _, loss = model(x, y, return_logits=False)
        weight = x.size(0) if batch is not None else 0
        totals[0] += loss.double() * weight
        totals[1] += weight
    D.all_reduce_sum(totals, info)
    model.train(was_training)
    return (totals[0] / totals[1]).item()


# ----- HellaSwag ------------------------------------------------------------------------
@dataclass(frozen=True)
class HellaSwagExample:
    context: str
    endings: tuple[str, ...]
    label: int


def read_hellaswag(path: str | os.PathLike) -> list[HellaSwagExample]:
    """The official jsonl (ctx, endings, label); a malformed line is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"HellaSwag file {path} does not exist; download hellaswag_val.jsonl (see README).")
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ex = HellaSwagExample(row["ctx"], tuple(row["endings"]), int(row["label"]))
            if len(ex.endings) < 2 or not 0 <= ex.label < len(ex.endings):
                raise ValueError("label must index one of at least two endings")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} line {n} is not a HellaSwag example (needs ctx, endings, label): {e}.") from None
        examples.append(ex)
    if not examples:
        raise ValueError(f"{path} holds no HellaSwag examples.")
    return examples


@torch.no_grad()
def hellaswag_losses(model, enc, example: HellaSwagExample, device: str) -> tuple[list[float], list[float]]:
    """(summed, mean) loss of each ending's tokens given the context: completion-style scoring."""
    block = model.config.block_size
    ctx = enc.encode_ordinary(example.context)
    rows, masks = [], []
    for ending in example.endings:
        end = enc.encode_ordinary(" " + ending)  # endings follow the context after a space
        tokens = (ctx + end)[-(block + 1) :]
        rows.append(tokens)
        masks.append([0] * (len(tokens) - len(end)) + [1] * len(end))
    width = max(map(len, rows))
    tok = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        tok[i, : len(r)], mask[i, : len(m)] = torch.tensor(r), torch.tensor(m, dtype=torch.float)
    tok, mask = tok.to(device), mask.to(device)
    logits, _ = model(tok[:, :-1])
    losses = F.cross_entropy(logits.float().transpose(1, 2), tok[:, 1:], reduction="none")  # (E, T-1)
    ending_mask = mask[:, 1:]
    summed = (losses * ending_mask).sum(1)
    mean = summed / ending_mask.sum(1)
    return summed.tolist(), mean.tolist()


def hellaswag(model, examples: list[HellaSwagExample], layout, autocast) -> dict:
    """acc (lowest summed loss) and acc_norm (lowest per-token loss), examples split across the data-parallel
    replicas (a parallel.Layout); under the run's autocast, as the val loss, so that the score is the run's
    dtype's whatever the strategy (FSDP gathers 16-bit weights, DDP's are fp32)."""
    from gpt2repro.tokenizer import gpt2

    enc, info = gpt2(), layout.info
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=info.device)  # (correct, correct_norm, n)
    size = layout.dp_size
    padded = math.ceil(len(examples) / size) * size  # the same forwards on every rank (FSDP)
    # Every example has rows of its own length: a compiled module (FSDP compiles each block in place)
    # would recompile for each new one, so HellaSwag runs the modules eagerly.
    with torch.compiler.set_stance("force_eager"):
        for i in range(layout.dp_rank, padded, size):
            ex = examples[i % len(examples)]
            with autocast:
                summed, mean = hellaswag_losses(model, enc, ex, info.device)
            if i < len(examples):
                counts[0] += int(min(range(len(summed)), key=summed.__getitem__) == ex.label)
                counts[1] += int(min(range(len(mean)), key=mean.__getitem__) == ex.label)
                counts[2] += 1
    D.all_reduce_sum(counts, info)
    model.train(was_training)
    n = int(counts[2])
    return {"acc": counts[0].item() / n, "acc_norm": counts[1].item() / n, "num_examples": n}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
