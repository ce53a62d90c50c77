"""The memory planner: per-GPU bytes of a training configuration, before anything is allocated.

An analytic count of what this trainer keeps alive at its peak (the end of forward or the
start of backward, when every activation is held): fp32 master weights, gradients, AdamW's
two moments, the activations of one micro-batch, and the loss's share. The per-token
activation sizes below are counted tensor by tensor for this model (model.py) with SDPA
attention, which never stores the T x T scores; torch.compile saves the same ones per block
(measured with saved-tensor hooks on CPU). Tests check the total against torch's MemTracker.

The loss: the plain path (full logits, F.cross_entropy) holds the fp32 log-softmax, its
gradient and the logits' gradient in eager mode (12 bytes per vocabulary entry per token);
compiled, only the logits in the compute dtype (the rest is fused and done in place). Under
FSDP/HSDP only the blocks are compiled (parallel.wrap), so the loss counts as eager there. The
fused chunked loss (loss.py) holds one chunk's logits at a time plus the fp32 weight
gradient it forms in forward, and each chunk's share of that gradient before it is added
(fp32 on CUDA, where cuBLAS forms it in fp32; the compute dtype elsewhere).

    DDP (or one process): everything replicated, so weights 4N, AdamW 8N, gradients 4N
        (DDP's buckets, or accumulation across micro-batches, keep them alive).
    FSDP2: weights, gradients and AdamW sharded (/ world size), plus the gathered 16-bit
        copies of the root (embeddings, ln_f) and of two blocks (the running one and the
        prefetched one); accumulation without a reduce-scatter per micro-batch keeps the
        unsharded fp32 gradients (4N) until the last micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2repro.devices import GiB
from gpt2repro.loss import default_chunk_size
from gpt2repro.model import GPTConfig

# Bytes per token per layer of one block's saved activations, in units of n_embd.
# fp32: x, ln_1 out, qkv (3), attention out, its contiguous copy, x mid, ln_2 out, fc (4), gelu (4) = 17 x 4 bytes.
# 16-bit autocast: the residual stream and the LayerNorm inputs stay fp32 (4 + 4), the other 15 are 16-bit.
_LAYER_BYTES = {4: 17 * 4, 2: 4 + 4 + 15 * 2}


@dataclass(frozen=True)
class MemoryPlan:
    num_params: int
    world_size: int
    batch_size: int
    block_size: int
    grad_accum_steps: int
    dtype: str
    strategy: str
    activation_checkpointing: bool
    fused_loss: bool
    compiled: bool
    weights: int  # bytes per GPU, here and below
    gradients: int
    optimizer: int
    activations: int
    optimizer_kind: str = "adamw"

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def fits(self, gpu_memory_bytes: float) -> bool:
        # Leave 10% for the CUDA context, the allocator's fragmentation and NCCL buffers.
        return self.total <= 0.9 * gpu_memory_bytes


def estimate(
    config: GPTConfig,
    *,
    batch_size: int,
    world_size: int,
    dtype: str,
    strategy: str,
    activation_checkpointing: bool = False,
    grad_accum_steps: int = 1,
    fused_loss: bool = True,
    compiled: bool = False,
    ranks_per_node: int = 0,
    optimizer: str = "adamw",
    device_type: str = "cuda",
) -> MemoryPlan:
    """Peak bytes per GPU for training `config` (dtype float32|bfloat16|float16; strategy ddp|fsdp|hsdp).

    hsdp shards within a node of ranks_per_node GPUs (0: all of world_size) and replicates across
    nodes: per GPU, it is fsdp on one node's ranks. compiled: torch.compile is on (what it covers
    depends on the strategy); device_type: where it runs (the fused loss's temporaries differ)."""
    if strategy not in ("ddp", "fsdp", "hsdp"):
        raise ValueError(f"strategy must be ddp, fsdp or hsdp, got {strategy!r}")
    C, L, T, V = config.n_embd, config.n_layer, config.block_size, config.padded_vocab_size
    half = 2 if dtype in ("bfloat16", "float16") else 4  # bytes of the compute dtype
    block_params = 12 * C * C + 13 * C if config.bias else 12 * C * C + 2 * C
    root_params = V * C + T * C + 2 * C
    N = L * block_params + root_params
    tokens = batch_size * T
    fsdp = strategy in ("fsdp", "hsdp")
    # The ranks each parameter is sharded over.
    W = {"ddp": 1, "fsdp": world_size, "hsdp": min(ranks_per_node or world_size, world_size)}[strategy]

    weights = 4 * N // W
    # AdamW: two fp32 moments per parameter. Muon: one fp32 momentum for the blocks' matrices (12 C^2 per
    # layer), AdamW's two for the rest; its Newton-Schulz works on one matrix at a time (small beside these).
    muon_params = L * 12 * C * C if optimizer == "muon" else 0
    optimizer_bytes = (4 * muon_params + 8 * (N - muon_params)) // W
    if fsdp:
        weights += half * (root_params + 2 * block_params)
        gradients = 4 * N if grad_accum_steps > 1 else 4 * N // W
    else:
        # Alive at the peak only when DDP's buckets hold them or micro-batches accumulate into them.
        gradients = 4 * N if (world_size > 1 or grad_accum_steps > 1) else 0

    per_layer = _LAYER_BYTES[half] * C
    head = (4 + half) * C  # ln_f's input and the lm_head's input (fused: the hidden states' gradient)
    loss_compiled = compiled and not fsdp  # FSDP compiles the blocks only: the root's head and loss run eagerly
    product = 4 if device_type == "cuda" else half  # the fused loss's per-chunk weight-gradient product
    loss = _loss_bytes(tokens, V, C, half, fused_loss, loss_compiled, product)
    dropout_masks = 3 * L * C if config.dropout > 0 else 0
    # Autocast's 16-bit copies of the weights, saved for backward (FSDP gathers 16-bit weights instead).
    copies = 2 if (half == 2 and not fsdp) else 0
    if activation_checkpointing:
        # Only each block's input is kept; a block is recomputed in backward after the loss's
        # memory is gone, so the peak is whichever of the two is larger.
        residual = 2 if (fsdp and half == 2) else 4
        activations = tokens * (L * residual * C + head) + max(loss, tokens * per_layer) + copies * root_params
    else:
        activations = tokens * (L * per_layer + head + dropout_masks) + loss + copies * N
    return MemoryPlan(
        num_params=N,
        world_size=world_size,
        batch_size=batch_size,
        block_size=T,
        grad_accum_steps=grad_accum_steps,
        dtype=dtype,
        strategy=strategy,
        activation_checkpointing=activation_checkpointing,
        fused_loss=fused_loss,
        compiled=compiled,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer_bytes,
        activations=activations,
        optimizer_kind=optimizer,
    )


def _loss_bytes(tokens: int, V: int, C: int, half: int, fused: bool, compiled: bool, product: int) -> int:
    """Bytes the loss adds at the peak: see the module docstring. product: bytes per entry of the fused
    loss's per-chunk weight-gradient product."""
    if not fused:
        return tokens * V * (half if compiled else 12)
    chunk = min(tokens, default_chunk_size(V))
    # One chunk's logits (compute dtype) beside their fp32 log-probabilities, then the chunk's
    # share of the weight gradient before it is added, in place, to the fp32 sum.
    chunk_bytes = chunk * V * (half + 4) + product * V * C
    # The fp32 weight gradient lives from forward to backward, which scales it into a new one; the
    # hidden states' gradient is formed chunk by chunk, then joined (a second copy, briefly).
    return 4 * V * C + max(chunk_bytes, 4 * V * C) + tokens * C * half


def choose_strategy(ddp_plan: MemoryPlan, gpu_memory_bytes: float, hsdp_plan: MemoryPlan | None = None) -> str:
    """auto: DDP while it fits (it is simpler and communicates less); when it does not, HSDP on several
    nodes (hsdp_plan given) if sharding within a node fits, so that the per-block all-gathers stay on
    the node's fast links; FSDP otherwise."""
    if ddp_plan.world_size > 1 and gpu_memory_bytes > 0 and not ddp_plan.fits(gpu_memory_bytes):
        return "hsdp" if hsdp_plan is not None and hsdp_plan.fits(gpu_memory_bytes) else "fsdp"
    return "ddp"


def format_plan(plan: MemoryPlan, gpu_memory_bytes: float) -> str:
    def gib(n: int) -> str:
        return f"{n / GiB:8.2f} GiB"

    lines = [
        f"model       {plan.num_params:,} parameters (vocabulary padded)",
        f"layout      {plan.strategy} on {plan.world_size} GPU(s), micro-batch {plan.batch_size} x {plan.block_size}"
        f" tokens, accumulation {plan.grad_accum_steps}, {plan.dtype}, "
        f"activation checkpointing {'on' if plan.activation_checkpointing else 'off'}, "
        f"fused loss {'on' if plan.fused_loss else 'off'}, compile {'on' if plan.compiled else 'off'}",
        f"weights     {gib(plan.weights)}",
        f"gradients   {gib(plan.gradients)}",
        f"optimizer   {gib(plan.optimizer)}   "
        + (
            "(AdamW, fp32 moments)"
            if plan.optimizer_kind == "adamw"
            else "(Muon momentum for the blocks' matrices, AdamW for the rest)"
        ),
        f"activations {gib(plan.activations)}   (one micro-batch)",
        f"total       {gib(plan.total)}   per GPU",
    ]
    if gpu_memory_bytes > 0:
        verdict = "fits" if plan.fits(gpu_memory_bytes) else "does NOT fit"
        lines.append(
            f"verdict     {verdict} in {gpu_memory_bytes / GiB:.1f} GiB (10% kept for the CUDA context, allocator)"
        )
        if not plan.fits(gpu_memory_bytes):
            lines.append(
                "            try --strategy fsdp, --activation_checkpointing true, a smaller --batch_size with "
                "--total_batch_tokens kept, or more GPUs"
            )
    else:
        lines.append("verdict     not checked: no GPU here; pass --gpu_memory_gb (e.g. 40 or 80)")
    return "\n".join(lines)
