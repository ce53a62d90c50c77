"""The classifier's loss without the full logits: a fused, chunked linear + cross-entropy.

GPT-2's last layer turns (tokens, n_embd) hidden states into (tokens, 50304) logits: at
16 x 1024 tokens 1.6 GB in bf16, and the loss's fp32 log-softmax and its gradient more
than double that. Here the logits exist one chunk of tokens at a time: each chunk's
logits (in the autocast dtype), their fp32 log-softmax, the loss, and at once the chunk's
gradient for the hidden states and its share of the weight's gradient. Nothing
chunk-sized outlives its chunk; backward only scales the two gradients formed in forward
(llm.c's fused classifier also forms the gradient in forward, over all tokens at once).

The gradients are formed for the summed loss, (softmax - one-hot), and scaled by
d(loss)/n_targets in backward: float16's loss scale then applies to them exactly as to
the plain path's, and the per-chunk weight gradients add up in fp32.
"""

from __future__ import annotations

import torch

# Tokens per chunk: chunk x vocabulary fp32 logits of about 256 MiB (1280 tokens for GPT-2's 50304).
CHUNK_ELEMENTS = 2**26


def default_chunk_size(vocab: int) -> int:
    """Tokens per chunk for a vocabulary of `vocab` rows: a multiple of 64 (matmul-friendly), at least 64."""
    return max(64, CHUNK_ELEMENTS // vocab // 64 * 64)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T, never materialised in full.

    hidden (N, C), weight (V_padded, C), targets (N,) with -1 for ignored positions.
    Only the first vocab_size columns enter the softmax (the rest are vocabulary padding).
    Same value and gradients as F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1)
    on the unpadded columns; under autocast the matmuls run in its dtype, the softmax in fp32.
    """
    vocab_size = vocab_size or weight.size(0)
    chunk_size = chunk_size or default_chunk_size(weight.size(0))
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    # Inside forward, needs_input_grad says only whether the inputs require gradients, which a
    # Parameter does even under torch.no_grad(): whether any are wanted is decided out here.
    grads_wanted = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk_size, compute_dtype, grads_wanted)


def _has_fp32_output_gemm(t: torch.Tensor) -> bool:
    """Whether t's device multiplies 16-bit matrices straight into an fp32 result (cuBLAS does; the
    out_dtype overloads are CUDA- and XPU-only). Tests force it on to lower this branch on a CPU."""
    return t.is_cuda


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place, with acc in fp32. On CUDA with 16-bit a and b the product is formed in fp32
    (products summed in fp32, no 16-bit (V, C) partial rounded, written and read back), then added: a
    (V, C) fp32 temporary, which the planner counts. torch.mm, not torch.addmm: Inductor's addmm lowering
    takes no out_dtype and fails to compile the addmm form (pytorch/pytorch#163880). Elsewhere (no such
    kernel): the product in the compute dtype, then the add."""
    if a.dtype != torch.float32 and _has_fp32_output_gemm(a):
        return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    return acc.add_(a @ b)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk_size, compute_dtype, grads_wanted):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        want_hidden, want_weight = grads_wanted and ctx.needs_input_grad[0], grads_wanted and ctx.needs_input_grad[1]
        grad_h_chunks = []
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kept = (targets != -1).unsqueeze(1)
        h_kept = h * kept if want_weight else h  # ignored positions' hidden states add nothing to grad_w
        # Chunks as views (split, narrow), never Python indexing: the same ops run on fake CUDA tensors in tests.
        splits = (t.split(chunk_size) for t in (h, targets, kept, h_kept))
        chunks = zip(*splits, strict=True)
        padding = weight.size(0) - vocab_size
        for h_chunk, targets_chunk, kept_chunk, h_kept_chunk in chunks:
            logits = h_chunk @ w.t()  # (chunk, V_padded), in the compute dtype
            logits.narrow(1, vocab_size, padding).fill_(float("-inf"))  # padding: exp(-inf) = 0, in the gradient too
            log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            del logits
            label = targets_chunk.clamp(min=0).unsqueeze(1)
            loss_sum -= (log_probs.gather(1, label) * kept_chunk).sum()
            if not (want_hidden or want_weight):
                continue
            grad_logits = log_probs.exp_()  # the softmax, in place
            grad_logits.scatter_add_(1, label, torch.full_like(label, -1.0, dtype=torch.float32))  # minus the one-hot
            grad_logits = grad_logits.to(compute_dtype)
            if want_hidden:
                grad_h_chunks.append((grad_logits @ w) * kept_chunk)  # ignored positions: no gradient
            if want_weight:
                grad_w = _add_product_fp32(grad_w, grad_logits.t(), h_kept_chunk)
        grad_h = torch.cat(grad_h_chunks) if want_hidden else None
        n_targets = kept.sum()
        ctx.save_for_backward(grad_h, grad_w, n_targets)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss_sum / n_targets  # 0/0 = nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, n_targets = ctx.saved_tensors
        scale = grad_loss.float() / n_targets
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = (grad_h.float() * scale).to(hidden_dtype) if grad_h is not None else None
        grad_weight = (grad_w * scale).to(weight_dtype) if grad_w is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None
