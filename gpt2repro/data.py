"""ShardLoader: rank-disjoint, deterministic, resumable batches of token windows.

The train split is cut into windows of block_size + 1 tokens (x and its shifted y) at
multiples of block_size inside each shard. An epoch visits every window once, in an
order drawn from (seed, epoch): shards shuffled, then windows within each shard. The
global stream of windows therefore depends only on the data, the seed and block_size.
Optimizer step s consumes the global windows [s*G, (s+1)*G), G = batch_size x
grad_accum_steps x world_size; each (rank, micro-step) takes its own disjoint slice.
Since the loss is the mean over all G windows, 1 rank x accumulation 2 and 2 ranks x
accumulation 1 train on exactly the same batches, and resuming needs only the step.

Validation uses the first eval_tokens of the val split in fixed, non-overlapping
windows, split across ranks; the same windows every time (and in launch/eval.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpt2repro import shards


class DataError(ValueError):
    """The data directory cannot feed this configuration."""


def _windows_per_shard(sizes: list[int], block_size: int) -> np.ndarray:
    return np.array([max(0, (n - 1) // block_size) for n in sizes], dtype=np.int64)


@dataclass(frozen=True)
class BatchSpec:
    batch_size: int  # per rank, per micro-step
    grad_accum_steps: int
    world_size: int
    rank: int

    @property
    def global_windows(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.world_size


class ShardLoader:
    def __init__(self, data_dir: str, block_size: int, vocab_size: int, spec: BatchSpec, seed: int, device: str):
        found = shards.find_shards(data_dir)
        self.shards = found["train"]
        if not self.shards:
            raise DataError(f"{data_dir} has no train shards; prepare it with data_prep/prepare.py.")
        self.tokens = [shards.open_tokens(s) for s in self.shards]
        self.block_size, self.vocab_size = block_size, vocab_size
        self.spec, self.seed, self.device = spec, seed, device
        self.windows = _windows_per_shard([t.size for t in self.tokens], block_size)
        self.num_windows = int(self.windows.sum())
        if self.num_windows == 0:
            longest = max(t.size for t in self.tokens)
            raise DataError(
                f"block_size {block_size} is longer than every train shard in {data_dir} (longest: {longest} "
                "tokens); use a smaller --block_size or prepare more data."
            )
        self._epoch, self._order = -1, None
        self.pin = torch.device(device).type == "cuda"

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, window index) of every window, in this epoch's order."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            shard_ids, window_ids = [], []
            for s in rng.permutation(len(self.shards)):
                shard_ids.append(np.full(self.windows[s], s, dtype=np.int64))
                window_ids.append(rng.permutation(self.windows[s]))
            self._epoch, self._order = epoch, (np.concatenate(shard_ids), np.concatenate(window_ids))
        return self._order

    def _window(self, g: int) -> np.ndarray:
        epoch, i = divmod(g, self.num_windows)
        shard_ids, window_ids = self._epoch_order(epoch)
        start = int(window_ids[i]) * self.block_size
        return self.tokens[shard_ids[i]][start : start + self.block_size + 1]

    def batch(self, step: int, micro_step: int, share: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch_size, block_size) for this rank at optimizer step `step` (1-based, as
        logged) and micro_step: a pure function of them, the seed and the world's layout. share: another
        rank's place in the layout to read for (a replica group making up for a lost one: gpt2repro/ft.py)."""
        spec = self.spec
        rank = spec.rank if share is None else share
        first = (step - 1) * spec.global_windows + (micro_step * spec.world_size + rank) * spec.batch_size
        rows = np.stack([self._window(g) for g in range(first, first + spec.batch_size)]).astype(np.int64)
        check_token_ids(rows, self.vocab_size, "train")
        return to_device(rows, self.device, self.pin)


def check_token_ids(rows: np.ndarray, vocab_size: int, split: str) -> None:
    # Checked here, on the CPU, so the model never needs a host sync to validate ids.
    if rows.size and int(rows.max()) >= vocab_size:
        raise DataError(
            f"The {split} data holds token id {int(rows.max())}, past the model's vocab_size {vocab_size}; "
            "set --vocab_size to the tokenizer's vocabulary (50257 for GPT-2)."
        )


def to_device(rows: np.ndarray, device: str, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows)
    if pin:
        t = t.pin_memory()
    t = t.to(device, non_blocking=True)
    return t[:, :-1], t[:, 1:]


class EvalWindows:
    """The first num_tokens of a split in non-overlapping windows; this rank's share of them."""

    def __init__(self, data_dir: str, split: str, block_size: int, num_tokens: int, vocab_size: int):
        found = shards.find_shards(data_dir)
        self.tokens = [shards.open_tokens(s) for s in found[split]]
        if not self.tokens or sum(t.size for t in self.tokens) <= block_size:
            raise DataError(
                f"The {split} split of {data_dir} has fewer than block_size + 1 = {block_size + 1} tokens; "
                "prepare a larger split or lower --block_size."
            )
        self.block_size, self.vocab_size = block_size, vocab_size
        starts = []  # (shard, offset) of each window, in order, within each shard
        for s, tok in enumerate(self.tokens):
            starts += [(s, k * block_size) for k in range((tok.size - 1) // block_size)]
        self.starts = starts[: max(1, num_tokens // block_size)]

    def __len__(self) -> int:
        return len(self.starts)

    def batches(self, batch_size: int, rank: int, world_size: int, device: str):
        mine = self.starts[rank::world_size]
        pin = torch.device(device).type == "cuda"
        for i in range(0, len(mine), batch_size):
            rows = np.stack([self.tokens[s][o : o + self.block_size + 1] for s, o in mine[i : i + batch_size]]).astype(
                np.int64
            )
            check_token_ids(rows, self.vocab_size, "val")
            yield to_device(rows, device, pin)
