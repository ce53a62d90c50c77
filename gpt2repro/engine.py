"""One optimizer step, and what it runs on: build_engine() lays the model out for its strategy, compiles it and
gives it its optimizer and scaler; train_step() runs one step. Training (gpt2repro/train.py), the tune and the
benchmarks all step through here.

One code path for every precision: a GradScaler always sits between backward and the optimizer. Under float16
it scales the loss as usual; under bfloat16/float32 its scale stays a power of two (exact), and it serves to
skip any step whose gradients are not finite without a host sync (fused AdamW reads its found-inf flag on the
device).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from gpt2repro import ft, guard, parallel
from gpt2repro.data import ShardLoader
from gpt2repro.model import GPT
from gpt2repro.optim import make_optimizer
from gpt2repro.precision import precision
from gpt2repro.schedule import lr_at


class UnitScaler(torch.amp.GradScaler):
    """bfloat16/float32 need no loss scaling: the scale stays 1.0 (multiplying by it is exact),
    and the scaler still skips non-finite steps. A skipped step does not halve it."""

    def __init__(self, device_type: str):
        super().__init__(device_type, init_scale=1.0, growth_interval=2**30)

    def update(self, new_scale=None) -> None:
        super().update(1.0)  # on the device, no host sync


def make_scaler(dtype: str, device_type: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device_type) if dtype == "float16" else UnitScaler(device_type)


@dataclass
class Engine:
    """What one optimizer step uses: the model as called (compiled, wrapped for the strategy) and as
    built, its optimizer and scaler, the batches, the autocast; built by build_engine for training and
    the benchmark alike."""

    cfg: object  # the run's settled config (gpt2repro/settings.py) (gpt2repro/settings.py)
    model: torch.nn.Module
    raw_model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: ShardLoader  # anything with .batch(step, micro) -> (x, y) and .device
    autocast: torch.autocast


def build_engine(cfg, layout: parallel.Layout, loader, seed: int) -> Engine:
    """The settled cfg's model (the weights GPT gets after torch.manual_seed(seed), whatever the layout), laid
    out for its strategy, compiled if it says so, with its optimizer and scaler."""
    device_type = layout.info.device_type
    _, autocast = precision(cfg.dtype, device_type)
    raw_model = parallel.build_model(cfg.model_config(), layout, cfg.dtype, seed, fp8=cfg.fp8)
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    raw_model.fused_loss = cfg.fused_loss == "true"
    optimizer, scaler = make_optimizer(raw_model, cfg), make_scaler(cfg.dtype, device_type)
    model = parallel.wrap(raw_model, layout, cfg.compile == "true")
    return Engine(cfg, model, raw_model, optimizer, scaler, loader, autocast)


def train_step(
    engine: Engine, step: int, judge=None, data_step: int | None = None, replicas=None
) -> tuple[torch.Tensor, ...] | None:
    """Optimizer step `step` (1-based, as logged) over grad_accum_steps micro-batches of batch `data_step`
    (default: step): (this rank's loss, the grad norm) on the device, no host sync. judge(step, loss,
    grad_norm), when given, runs before the update and says whether to skip it (a 0-d bool tensor): the
    spike guard.

    replicas (gpt2repro/ft.py's Replicas, after its quorum): this rank computes the shares of the batch its
    replica group takes this step, and the gradients are summed across the live groups; None when a group was
    lost during the step (nothing updated: the step is to be taken again)."""
    cfg, model = engine.cfg, engine.model
    data_step = step if data_step is None else data_step
    for group in engine.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss_sum = torch.zeros((), device=engine.loader.device)
    shares = [None] if replicas is None else replicas.shares()
    micro_batches = [(share, micro) for share in shares for micro in range(cfg.grad_accum_steps)]
    divisor = cfg.grad_accum_steps * (1 if replicas is None else cfg.ft_groups)
    for i, (share, micro) in enumerate(micro_batches):
        if share is not None and micro == 0 and cfg.dropout:
            torch.manual_seed(ft.dropout_seed(cfg.seed, data_step, share))  # whichever group computes it
        x, y = engine.loader.batch(data_step, micro) if share is None else engine.loader.batch(data_step, micro, share)
        # Gradients cross ranks once per optimizer step: on the last micro-batch.
        with parallel.gradient_sync(model, last_micro_batch=i == len(micro_batches) - 1):
            with engine.autocast:
                loss = model(x, y, return_logits=False)[1] / divisor
            engine.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if replicas is not None and not replicas.reduce_and_commit(parallel.local_gradients(engine.raw_model), loss_sum):
        engine.optimizer.zero_grad(set_to_none=True)
        return None
    engine.scaler.unscale_(engine.optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = parallel.clip_grad_norm(engine.raw_model.parameters(), max_norm)
    spike_skip = contextlib.nullcontext()
    if judge is not None:
        spike_skip = guard.skip_update(engine.scaler, engine.optimizer, judge(step, loss_sum, grad_norm))
    with spike_skip:
        engine.scaler.step(engine.optimizer)  # skipped when gradients hold inf/nan (on any rank), or on a spike
        engine.scaler.update()
    engine.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm
