"""Teach a GPT to add n-digit numbers (minGPT's adder project), then report held-out accuracy.

    python examples/adder.py --ndigit 2

An example "85 + 50 = 135" is encoded as the digits 8 5 5 0 5 3 1: both operands,
then the sum reversed (the model emits its lowest digit first, as done by hand).
The loss is only on the sum's digits. 2-digit sums reach 100% on held-out pairs.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from torch.utils.data import Dataset

from gpt2repro.model import GPT, GPTConfig
from gpt2repro.runtime import underscored
from gpt2repro.trainer import Trainer, TrainerConfig
from gpt2repro.utils import set_seed


class AdditionDataset(Dataset):
    """All n-digit pairs, split into a fixed held-out test set (20%, at most 500) and train."""

    def __init__(self, ndigit: int, split: str, seed: int = 1337):
        self.ndigit = ndigit
        num = (10**ndigit) ** 2
        perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
        num_test = min(int(num * 0.2), 500)
        self.ixes = perm[:num_test] if split == "test" else perm[num_test:]

    vocab_size = 10

    @property
    def block_size(self) -> int:
        return 3 * self.ndigit + 1 - 1  # a, b, reversed sum with a carry digit; minus the shift

    def __len__(self) -> int:
        return self.ixes.numel()

    def operands(self, idx: int) -> tuple[int, int]:
        n = 10**self.ndigit
        return divmod(int(self.ixes[idx]), n)

    def __getitem__(self, idx: int):
        a, b = self.operands(idx)
        digits = f"{a:0{self.ndigit}d}{b:0{self.ndigit}d}" + f"{a + b:0{self.ndigit + 1}d}"[::-1]
        seq = torch.tensor([int(c) for c in digits], dtype=torch.long)
        x, y = seq[:-1].clone(), seq[1:].clone()
        y[: 2 * self.ndigit - 1] = -1  # no loss on predicting the operands
        return x, y


@torch.no_grad()
def accuracy(model: GPT, dataset: AdditionDataset, device: str, batch_size: int = 500) -> float:
    """Fraction of the dataset's sums the model gets exactly right, decoding greedily."""
    model.eval()
    n = dataset.ndigit
    correct = 0
    for start in range(0, len(dataset), batch_size):
        idxs = range(start, min(start + batch_size, len(dataset)))
        x = torch.stack([dataset[i][0][: 2 * n] for i in idxs]).to(device)
        out = model.generate(x, n + 1, do_sample=False)[:, 2 * n :].flip(1)  # undo the reversal
        place = 10 ** torch.arange(n, -1, -1, device=device)
        predicted = (out * place).sum(1)
        truth = torch.tensor([sum(dataset.operands(i)) for i in idxs], device=device)
        correct += int((predicted == truth).sum())
    model.train()
    return correct / len(dataset)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ndigit", type=int, default=2)
    p.add_argument("--max_iters", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--n_layer", type=int, default=3)
    p.add_argument("--n_head", type=int, default=3)
    p.add_argument("--n_embd", type=int, default=48)
    p.add_argument("--seed", type=int, default=3407)
    args = p.parse_args(underscored(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_seed(args.seed)

    train_set, test_set = AdditionDataset(args.ndigit, "train"), AdditionDataset(args.ndigit, "test")
    config = GPTConfig(
        vocab_size=10, block_size=train_set.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd
    )
    model = GPT(config)
    epochs = -(-args.max_iters * args.batch_size // len(train_set))  # enough epochs to reach max_iters
    trainer = Trainer(
        model,
        train_set,
        test_set,
        TrainerConfig(max_epochs=epochs, max_iters=args.max_iters, batch_size=args.batch_size, learning_rate=args.lr),
    )
    trainer.train()
    train_acc = accuracy(model, train_set, trainer.device)
    test_acc = accuracy(model, test_set, trainer.device)
    print(
        f"{args.ndigit}-digit addition after {trainer.iter_num} iters: train accuracy {train_acc:.2%}, "
        f"held-out accuracy {test_acc:.2%} ({len(test_set)} pairs)"
    )
    return test_acc


if __name__ == "__main__":
    main()
