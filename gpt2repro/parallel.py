"""How the model is laid out across ranks: DDP (replicated) or FSDP2 (sharded), and the
pieces of a step that differ between them (gradient sync during accumulation, the norm).

    ddp  : every rank holds the whole model and AdamW state; gradients are all-reduced once
           per optimizer step. Simplest and fastest while it fits in memory.
    fsdp : torch.distributed.fsdp.fully_shard per transformer block and at the root
           (embeddings, ln_f, the tied lm_head): parameters, gradients and AdamW state are
           sharded across ranks, blocks are all-gathered in 16-bit just before they run,
           gradients are reduce-scattered in fp32. Needed from GPT-2 1558M on 40 GB GPUs.
    hsdp : fsdp within each node, replicated across nodes (a 2-D device mesh): the per-block
           all-gathers and reduce-scatters stay on a node's fast links, and only one gradient
           all-reduce per step crosses nodes. For multi-node jobs that need sharding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2repro import fp8 as fp8_training
from gpt2repro import memory
from gpt2repro.devices import GiB
from gpt2repro.distributed import DistInfo
from gpt2repro.model import GPT, GPTConfig
from gpt2repro.precision import PTDTYPE
from gpt2repro.schema import Settings, setting


@dataclass(frozen=True)
class ParallelSettings(Settings):
    TITLE = "parallelism and memory"

    device: str = setting(
        "auto", "auto: this rank's GPU, else the CPU", auto=True, resumable=True, choices=("auto", "cpu", "cuda")
    )
    strategy: str = setting(
        "auto",
        "how ranks hold the model (auto: ddp where the memory plan says it fits; else hsdp across nodes, fsdp on one)",
        auto=True,
        resumable=True,
        choices=("auto", "ddp", "fsdp", "hsdp"),
    )
    activation_checkpointing: bool = setting(
        False,
        "recompute each block's activations in the backward: less memory, about a third more compute",
        resumable=True,
    )
    gpu_memory_gb: float = setting(
        0.0, "GPU memory the planner counts (0: this GPU's; none on a CPU)", auto=True, resumable=True, at_least=0
    )
    dry_run: bool = setting(
        False,
        "print the batch and the memory plan (with --world_size, --gpus_per_node) and train nothing",
        resumable=True,
    )

    def settled(self, machine) -> dict:
        """The device, the GPU memory counted, and strategy auto: the planner's choice for this machine."""
        changes = {"device": machine.device_type, "gpu_memory_gb": self.gpu_memory_gb or machine.gpu_memory_bytes / GiB}
        if self.strategy == "auto":
            changes["strategy"] = plan_on(dataclasses.replace(self, **changes), machine).strategy
        return changes


@dataclass(frozen=True)
class Layout:
    """How the ranks share the work, built once per run (`layout`): the strategy, and this rank's place
    among the data-parallel replicas, which data, evaluation and the loss's average go by. Today every
    rank is a replica of its own (dp_rank = rank, dp_size = world size) under ddp, fsdp and hsdp alike;
    tensor or context parallelism would plug in here, giving several ranks one dp_rank."""

    info: DistInfo
    strategy: str = "ddp"  # ddp | fsdp | hsdp
    dp_rank: int = 0
    dp_size: int = 1
    mesh: DeviceMesh | None = None  # hsdp's (replicate, shard) mesh; None: fsdp shards over all ranks

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp", "hsdp")


def layout(strategy: str, info: DistInfo) -> Layout:
    """The layout of `strategy` over this launch's ranks (hsdp: in nodes of info.local_world_size)."""
    mesh = hsdp_mesh(info.device, info.local_world_size) if strategy == "hsdp" else None
    return Layout(info, strategy, info.rank, info.world_size, mesh)


def plan_on(cfg, machine) -> memory.MemoryPlan:
    """The memory plan of a settled run's config on machine (strategy auto: the one the planner picks)."""
    gpu_bytes = cfg.gpu_memory_gb * GiB
    return plan(cfg, cfg.model_config(), machine.world_size, gpu_bytes, machine.device_type, machine.ranks_per_node)


def plan(
    cfg, config: GPTConfig, world_size: int, gpu_bytes: float, device_type: str, ranks_per_node: int = 0
) -> memory.MemoryPlan:
    """The memory plan of cfg's layout (its dtype, compile and fused loss settled: gpt2repro/settings.py) on
    device_type, with strategy auto resolved (to ddp, fsdp, or hsdp when the ranks span several nodes of
    ranks_per_node; 0: one node)."""

    def estimate(strategy: str) -> memory.MemoryPlan:
        return memory.estimate(
            config,
            batch_size=cfg.batch_size,
            world_size=world_size,
            dtype=cfg.dtype,
            strategy=strategy,
            activation_checkpointing=cfg.activation_checkpointing,
            grad_accum_steps=cfg.grad_accum_steps,
            fused_loss=cfg.fused_loss == "true",
            compiled=cfg.compile == "true",
            ranks_per_node=ranks_per_node,
            optimizer=cfg.optimizer,
            device_type=device_type,
        )

    if cfg.strategy != "auto":
        return estimate(cfg.strategy)
    several_nodes = 0 < ranks_per_node < world_size
    return estimate(memory.choose_strategy(estimate("ddp"), gpu_bytes, estimate("hsdp") if several_nodes else None))


def build_model(config: GPTConfig, layout: Layout, dtype: str, seed: int, fp8: bool = False) -> GPT:
    """The model laid out as `layout` says on its device, with the weights GPT(config) gets after
    torch.manual_seed(seed) on the CPU, whatever the layout; fp8: the blocks' Linear layers
    train in float8 (gpt2repro/fp8.py), converted before sharding (ValueError where unsupported).

    ddp: built whole on the CPU, then moved. fsdp, hsdp: built on the meta device (no memory),
    sharded, and only then given memory: each rank holds just its shards (1558M: ~6 GB of fp32
    weights per rank otherwise, 48 GB per 8-GPU node, before any sharding). hsdp shards within
    nodes and replicates across them (layout.mesh).
    """
    device = layout.info.device
    if fp8:
        fp8_training.check_supported(device)  # before any memory is spent
    torch.manual_seed(seed)
    if not layout.sharded:
        model = GPT(config).to(device)
        if fp8:
            fp8_training.convert(model)
        return model
    with torch.device("meta"):
        model = GPT(config)
    if fp8:
        fp8_training.convert(model)
    shard(model, dtype, layout.mesh)
    model.to_empty(device=device)
    _replay_init(model, seed)
    return model


def _replay_init(model: GPT, seed: int) -> None:
    """Fill a sharded model with GPT(config)'s weights, one full parameter at a time on the CPU.

    GPT.__init__ draws from the RNG twice per weight: the default init of each nn.Linear and
    nn.Embedding as it is constructed (then overwritten), and GPT._init_weights (named_modules
    order; the tied lm_head/wte weight drawn twice, the second draw kept). A
    meta build makes neither draw, so both are replayed here in the same order, on full-size
    CPU tensors; each rank keeps its own slice of every result.
    """
    torch.manual_seed(seed)
    for module in model.modules():  # construction order
        if isinstance(module, nn.Linear):
            nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        elif isinstance(module, nn.Embedding):
            nn.Embedding(module.num_embeddings, module.embedding_dim)
    for name, module in model.named_modules():  # GPT.__init__'s order
        _init_shards(model, name, module)


def _init_shards(model: GPT, name: str, module: nn.Module) -> None:
    """module's parameters, initialised as GPT._init_weights does on full CPU tensors, each rank keeping
    its slice. A function of its own so that one module's full tensors are freed before the next's
    exist (the meta build's peak is one full module, not two)."""
    params = dict(module.named_parameters(recurse=False))
    if not params:
        return
    cls, args = _plain_twin(module)
    shadow = torch.nn.utils.skip_init(cls, *args, device="cpu")
    model._init_weights(shadow, name)  # by name: the same std whatever the module's class
    with torch.no_grad():
        for param_name, param in params.items():
            full = getattr(shadow, param_name).detach()
            # Every rank computed the same full tensor: each just keeps its slice (no communication).
            mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(mine.to_local())


def _plain_twin(module: nn.Module) -> tuple[type[nn.Module], tuple]:
    """The torch.nn class and arguments that build `module` afresh (fp8's Float8Linear is an nn.Linear)."""
    if isinstance(module, nn.Linear):
        return nn.Linear, (module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, nn.Embedding):
        return nn.Embedding, (module.num_embeddings, module.embedding_dim)
    if isinstance(module, nn.LayerNorm):
        return nn.LayerNorm, (module.normalized_shape, module.eps, module.elementwise_affine, module.bias is not None)
    raise TypeError(f"no meta-device init for {type(module).__name__}")


def hsdp_mesh(device: str, ranks_per_node: int) -> DeviceMesh:
    """(nodes, ranks per node): torchrun numbers each node's ranks contiguously, so a row is one node.
    FSDP2 on a 2-D mesh replicates along the first dimension and shards along the second."""
    world_size = torch.distributed.get_world_size()
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(f"--strategy hsdp needs whole nodes: {world_size} ranks in nodes of {ranks_per_node}.")
    shape = (world_size // ranks_per_node, ranks_per_node)
    return init_device_mesh(torch.device(device).type, shape, mesh_dim_names=("replicate", "shard"))


def shard(model: GPT, dtype: str, mesh: DeviceMesh | None = None) -> None:
    """FSDP2 in place: one group per block, the root group holds the rest (so the tied weight once).
    mesh: a 2-D (replicate, shard) mesh for HSDP; None shards over all ranks."""
    compute = PTDTYPE[dtype] if dtype != "float32" else None
    # Compute in 16-bit, keep fp32 master weights, reduce gradients in fp32.
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    # GPT.forward returns the logits without the padded columns, a view; nothing writes to it in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        # Backward starts with the last block: keeping it gathered after forward saves an all-gather.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def wrap(model: GPT, layout: Layout, compile_on: bool) -> torch.nn.Module:
    """The module that training calls: compiled and wrapped for the layout's strategy.

    For fsdp, `shard` must already have run (before the optimizer is built); each block is
    compiled on its own, which keeps FSDP's hooks between compiled regions.
    """
    info = layout.info
    if layout.sharded:
        if compile_on:
            for block in model.transformer.h:
                block.compile()
        return model
    compiled = torch.compile(model) if compile_on else model
    if not info.is_distributed:
        return compiled
    # Gradients as views into DDP's buckets: one copy of them, not two.
    device_ids = [info.local_rank] if info.device_type == "cuda" else None
    return DDP(compiled, device_ids=device_ids, gradient_as_bucket_view=True)


def for_eval(model: torch.nn.Module) -> torch.nn.Module:
    """The module to evaluate with: DDP's inner one (no gradient hooks); an FSDP model as it is."""
    return model.module if isinstance(model, DDP) else model


def gradient_sync(model: torch.nn.Module, last_micro_batch: bool):
    """Context for one micro-batch's backward: gradients cross ranks only on the last one."""
    if isinstance(model, FSDPModule):
        # Skipped reduce-scatters keep unsharded fp32 gradients until the last micro-batch (the planner counts them).
        model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()
    if isinstance(model, DDP) and not last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()


def local_gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's gradient tensors, in parameter order: its local shards under FSDP (views, no copies)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all shards under FSDP), gradients scaled down to max_norm; no host sync."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(norm, DTensor):  # sharded gradients: the shards' partial norms are combined across ranks
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
