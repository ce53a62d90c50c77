"""Character-level GPT on any text file (minGPT's chargpt project); reports val loss and a sample.

    python examples/chargpt.py --text examples/tinyshakespeare.txt

The first 90% of the text trains, the last 10% is held out. Each character is a token.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gpt2repro.model import GPT, GPTConfig
from gpt2repro.runtime import underscored
from gpt2repro.trainer import Trainer, TrainerConfig
from gpt2repro.utils import sample, set_seed


class CharDataset(Dataset):
    """Every window of block_size + 1 characters of `text`, as (x, y) shifted by one."""

    def __init__(self, text: str, block_size: int, chars: list[str]):
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.itos = dict(enumerate(chars))
        self.block_size = block_size
        self.data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        if len(self.data) <= block_size:
            raise ValueError(f"The text has {len(self.data)} characters; it needs more than block_size={block_size}.")

    def __len__(self) -> int:
        return len(self.data) - self.block_size

    def __getitem__(self, idx: int):
        chunk = self.data[idx : idx + self.block_size + 1]
        return chunk[:-1], chunk[1:]

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, default=Path(__file__).with_name("tinyshakespeare.txt"))
    p.add_argument("--max_iters", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--val_batches", type=int, default=50, help="random val windows x batch size to evaluate")
    p.add_argument("--prompt", default="O God, O God!")
    p.add_argument("--seed", type=int, default=3407)
    args = p.parse_args(underscored(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_seed(args.seed)

    if not args.text.is_file():
        raise SystemExit(f"error: text file {args.text} does not exist; pass one with --text.")
    text = args.text.read_text(encoding="utf-8")
    chars = sorted(set(text))
    split = int(0.9 * len(text))
    train_set = CharDataset(text[:split], args.block_size, chars)
    val_set = CharDataset(text[split:], args.block_size, chars)
    # A random, fixed subset of val windows: evaluating every window would take longer than training.
    val_idx = torch.randperm(len(val_set), generator=torch.Generator().manual_seed(0))
    val_subset = torch.utils.data.Subset(val_set, val_idx[: args.val_batches * args.batch_size].tolist())

    config = GPTConfig(len(chars), args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config)
    trainer = Trainer(
        model,
        train_set,
        None,
        TrainerConfig(max_epochs=1, max_iters=args.max_iters, batch_size=args.batch_size, learning_rate=args.lr),
    )
    trainer.train()
    val_loss = evaluate(model, val_subset, args.batch_size, trainer.device)
    prompt = "".join(c for c in args.prompt if c in train_set.stoi) or text[0]
    x = train_set.encode(prompt)[None].to(trainer.device)
    y = sample(model, x, steps=300, temperature=1.0, sample=True, top_k=10)[0]
    print(f"after {trainer.iter_num} iters: val loss {val_loss:.4f} (uniform: {math.log(len(chars)):.4f})")
    print(train_set.decode(y))
    return val_loss


@torch.no_grad()
def evaluate(model: GPT, dataset: Dataset, batch_size: int, device: str) -> float:
    model.eval()
    losses = [model(x.to(device), y.to(device))[1].item() for x, y in torch.utils.data.DataLoader(dataset, batch_size)]
    model.train()
    return sum(losses) / len(losses)


if __name__ == "__main__":
    main()
