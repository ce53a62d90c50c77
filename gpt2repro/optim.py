"""The optimizers: AdamW (GPT-2's recipe, the default) or Muon for the blocks' matrices.

--optimizer muon: Muon (torch.optim.Muon's algorithm: Nesterov momentum, then a Newton-Schulz
orthogonalisation of the update, decoupled weight decay) for the 2-D weights inside the
transformer blocks (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), at --muon_lr; AdamW for
the embeddings, the tied head, biases and LayerNorm gains, at --lr. The schedule scales both.

MuonAdamW is one torch Optimizer over all of them, so that checkpoints (DCP), resharding,
GradScaler and the loop treat it as they treat AdamW. It reads the GradScaler's found_inf on
the device, so a step with non-finite gradients is skipped without a host sync. Under FSDP/HSDP
each rank holds a shard of every matrix, but Newton-Schulz needs the whole matrix: the
Nesterov update (elementwise, so computed on the shards) is all-gathered, the matrix's owner
(matrices are dealt round-robin over the shard group's ranks, a round of one matrix per rank at
a time, so the ranks orthogonalise theirs at once) broadcasts the result, and each rank keeps
its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr

from gpt2repro.precision import resolve_dtype
from gpt2repro.schema import Settings, setting

MUON_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's (Keller Jordan's quintic)
NS_STEPS = 5
ADJUST_LR = "match_rms_adamw"  # Moonshot's: an update RMS like AdamW's, so its lr and weight decay carry over


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    TITLE = "optimizer and schedule"

    optimizer: str = setting(
        "adamw", "muon: Muon for the blocks' matrices, AdamW for the rest", choices=("adamw", "muon")
    )
    # 0: twice lr, the ratio benchmarks/optimizer_steps.py found best (docs/training.md, Muon)
    muon_lr: float = setting(0.0, "--optimizer muon: the Muon matrices' peak lr (0: twice --lr)", auto=True, at_least=0)
    weight_decay: float = setting(0.1, "AdamW's (and Muon's) decoupled weight decay, on matrices only", at_least=0)
    beta1: float = setting(0.9, "AdamW's beta1 (Muon's momentum)")
    beta2: float = setting(0.95, "AdamW's beta2")
    grad_clip: float = setting(1.0, "clip the global grad norm to this (0: no clipping)", at_least=0)

    def problems(self) -> list[str]:
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            return [f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}"]
        return []

    def settled(self, machine) -> dict:
        return {"muon_lr": 2 * self.lr} if self.optimizer == "muon" and not self.muon_lr else {}


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "muon":
        return MuonAdamW(model, cfg)
    # Fused AdamW: one kernel on CUDA; on this CPU build it is also the variant that is
    # bitwise reproducible across processes (the foreach one is not), which exact resume needs.
    return torch.optim.AdamW(model.optim_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def newton_schulz_dtype(run_dtype: str) -> torch.dtype:
    """bfloat16 for bfloat16 runs, as torch.optim.Muon (and Keller Jordan's). float32 otherwise: a float32
    run stays comparable across layouts (FSDP vs one process) to 1e-5, and a float16 run is on a GPU
    without bfloat16 tensor cores (below sm80), where bfloat16 would be emulated."""
    return torch.bfloat16 if run_dtype == "bfloat16" else torch.float32


def is_muon_matrix(name: str) -> bool:
    return name.startswith("transformer.h.") and name.endswith(MUON_MATRICES)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the blocks' matrices, fused AdamW for the rest (the module docstring says how)."""

    _step_supports_amp_scaling = True  # GradScaler hands over found_inf (and grad_scale) instead of syncing

    def __init__(self, model, cfg):
        if not cfg.muon_lr > 0:
            raise ValueError("muon_lr is 0: settle the config first (gpt2repro/settings.py gives it twice lr)")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.ns_dtype = newton_schulz_dtype(resolve_dtype(cfg.dtype, named[0][1].device.type))
        muon = [p for n, p in named if is_muon_matrix(n)]
        rest = [p for n, p in named if not is_muon_matrix(n)]
        groups = [
            {"params": muon, "kind": "muon", "lr_scale": cfg.muon_lr / cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() >= 2], "kind": "adamw", "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "kind": "adamw", "weight_decay": 0.0},
        ]
        defaults = dict(lr=cfg.lr, lr_scale=1.0, betas=(cfg.beta1, cfg.beta2), eps=1e-8, momentum=0.95)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr = group["lr"] * group["lr_scale"]
            if group["kind"] == "adamw":
                self._adamw(group, params, lr, grad_scale, found_inf)
            else:
                self._muon(group, params, lr, grad_scale, found_inf)

    def _adamw(self, group, params, lr, grad_scale, found_inf) -> None:
        """torch.optim.AdamW(fused=True)'s step, with its kernel."""
        for p in params:
            if not self.state[p]:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            steps,
            amsgrad=False,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
        if found_inf is not None:
            torch._foreach_sub_(steps, [found_inf] * len(steps))

    def _muon(self, group, params, lr, grad_scale, found_inf) -> None:
        momentum = group["momentum"]
        # Sharded (FSDP/HSDP): one matrix per rank of the shard group at a time, so that each rank
        # orthogonalises its own at once; whole (DDP, one process): one at a time.
        per_round = _shard_group_size(params[0])
        for start in range(0, len(params), per_round):
            matrices = params[start : start + per_round]
            bufs, updates = [], []
            for p in matrices:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                grad = p.grad if grad_scale is None else p.grad / grad_scale
                bufs.append(state["momentum_buffer"].lerp(grad, 1 - momentum))
                updates.append(grad.lerp(bufs[-1], momentum))  # Nesterov
            for p, buf, ortho in zip(matrices, bufs, orthogonalize(updates, self.ns_dtype), strict=True):
                new_p = p.mul(1 - lr * group["weight_decay"]).add_(ortho, alpha=-_adjust_lr(lr, ADJUST_LR, p.shape))
                for old, new in ((self.state[p]["momentum_buffer"], buf), (p, new_p)):
                    old, new = _local(old), _local(new)  # FSDP: this rank's rows
                    # A step with non-finite gradients changes nothing, decided on the device.
                    old.copy_(new if found_inf is None else torch.where(found_inf > 0, old, new))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_group(t: DTensor) -> dist.ProcessGroup:
    """The ranks t's rows are sharded over (HSDP: within a node; its mesh's "shard" dimension)."""
    mesh = t.device_mesh
    return (mesh["shard"] if mesh.mesh_dim_names and "shard" in mesh.mesh_dim_names else mesh).get_group()


def _shard_group_size(t: torch.Tensor) -> int:
    return dist.get_world_size(_shard_group(t)) if isinstance(t, DTensor) else 1


def orthogonalize(updates: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Newton-Schulz of whole matrices. Plain tensors: each as is. FSDP/HSDP shards, at most one per rank of
    the shard group: every matrix is gathered, rank i of the group orthogonalises matrix i (all ranks at
    once, none waits on another's), then each result is broadcast from its owner and every rank keeps its
    rows (DTensors like the updates)."""
    if not isinstance(updates[0], DTensor):
        return [newton_schulz(u, dtype) for u in updates]
    group = _shard_group(updates[0])
    assert len(updates) <= dist.get_world_size(group), "one matrix per rank of the shard group at most"
    fulls = [u.full_tensor() for u in updates]
    mine = dist.get_rank(group)
    if mine < len(fulls):
        fulls[mine] = newton_schulz(fulls[mine], dtype).contiguous()  # a tall matrix comes back transposed
    for owner, full in enumerate(fulls):
        dist.broadcast(full, group=group, group_src=owner)
    return [
        distribute_tensor(f, u.device_mesh, u.placements, src_data_rank=None)
        for f, u in zip(fulls, updates, strict=True)
    ]


def newton_schulz(matrix: torch.Tensor, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Muon: X <- aX + (bA + cA^2)X with A = XX^T, from X = M / |M|_F,
    on the wide orientation; about US'V^T of M = USV^T with S' near 1. In `dtype`, returned in M's."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(matrix.dtype)
