"""minGPT's small single-process Trainer, for any torch Dataset of (x, y) pairs.

This is the seed article's API, kept for small experiments (see examples/). The
scale-up trainer for GPT-2 on OpenWebText is launch/train.py (gpt2repro.train).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

logger = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_norm_clip: float = 1.0
    weight_decay: float = 0.1  # only applied to matmul weights and embeddings
    # Learning-rate decay as in minGPT: linear warmup over warmup_tokens, then cosine
    # down to 10% of learning_rate at final_tokens (tokens = non-ignored targets seen).
    lr_decay: bool = False
    warmup_tokens: float = 375e6
    final_tokens: float = 260e9
    ckpt_path: str | None = None  # state_dict saved here whenever the test loss improves
    num_workers: int = 0
    max_iters: int | None = None  # stop after this many optimizer steps (None: run all epochs)
    device: str = "auto"  # "auto" picks cuda when available
    progress: bool = True  # tqdm bar per epoch (shown on terminals only)


class Trainer:
    def __init__(self, model: torch.nn.Module, train_dataset: Dataset, test_dataset: Dataset | None, config):
        self.model = model
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.config = config
        device = getattr(config, "device", "auto")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model.to(self.device)
        self.tokens = 0  # targets processed so far, for lr decay
        self.iter_num = 0
        self.train_losses: list[float] = []
        self.test_losses: list[float] = []

    def save_checkpoint(self) -> None:
        logger.info("saving %s", self.config.ckpt_path)
        torch.save(self.model.state_dict(), self.config.ckpt_path)

    def _lr(self) -> float:
        cfg = self.config
        if not cfg.lr_decay:
            return cfg.learning_rate
        if self.tokens < cfg.warmup_tokens:
            mult = self.tokens / max(1.0, cfg.warmup_tokens)
        else:
            progress = (self.tokens - cfg.warmup_tokens) / max(1.0, cfg.final_tokens - cfg.warmup_tokens)
            mult = max(0.1, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
        return cfg.learning_rate * mult

    def _run_epoch(self, split: str, optimizer: torch.optim.Optimizer) -> float:
        is_train = split == "train"
        self.model.train(is_train)
        data = self.train_dataset if is_train else self.test_dataset
        loader = DataLoader(
            data,
            shuffle=is_train,
            pin_memory=self.device.startswith("cuda"),
            batch_size=self.config.batch_size,
            num_workers=self.config.num_workers,
        )
        losses = []
        # disable=None: a bar on terminals only, so logs and CI output stay readable.
        bar = tqdm(loader, disable=None if (is_train and self.config.progress) else True, leave=False)
        for x, y in bar:
            x, y = x.to(self.device), y.to(self.device)
            with torch.set_grad_enabled(is_train):
                _, loss = self.model(x, y, return_logits=False)
            losses.append(loss.item())
            if not is_train:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_norm_clip)
            lr = self._lr()
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            self.tokens += int((y >= 0).sum())
            self.iter_num += 1
            self.train_losses.append(losses[-1])
            bar.set_description(f"iter {self.iter_num}: train loss {losses[-1]:.5f} lr {lr:e}")
            if self.config.max_iters is not None and self.iter_num >= self.config.max_iters:
                break
        return sum(losses) / max(1, len(losses))

    def train(self) -> None:
        optimizer = self.model.configure_optimizers(self.config)
        best_loss = float("inf")
        for epoch in range(self.config.max_epochs):
            train_loss = self._run_epoch("train", optimizer)
            line = f"epoch {epoch + 1}: train loss {train_loss:.5f}"
            if self.test_dataset is not None:
                test_loss = self._run_epoch("test", optimizer)
                self.test_losses.append(test_loss)
                line += f", test loss {test_loss:.5f}"
                if self.config.ckpt_path is not None and test_loss < best_loss:
                    best_loss = test_loss
                    self.save_checkpoint()
            elif self.config.ckpt_path is not None:
                self.save_checkpoint()
            logger.info(line)
            if self.config.max_iters is not None and self.iter_num >= self.config.max_iters:
                break
