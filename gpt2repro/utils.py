"""minGPT's small helpers: seeding and sample()."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    x: torch.Tensor,
    steps: int,
    temperature: float = 1.0,
    sample: bool = False,
    top_k: int | None = None,
) -> torch.Tensor:
    """Extend the conditioning sequence x (B, T) by `steps` tokens (minGPT's signature).

    sample=False takes the most likely token each step; sample=True draws from the
    softmax, restricted to the top_k tokens when top_k is given.
    """
    was_training = model.training
    model.eval()
    try:
        return model.generate(x, steps, temperature=temperature, top_k=top_k, do_sample=sample)
    finally:
        model.train(was_training)
