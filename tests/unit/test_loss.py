"""The fused chunked loss against the plain one: F.cross_entropy on the full logits (the oracle)."""

import pytest
import torch
from torch.nn import functional as F

from gpt2repro.loss import linear_cross_entropy
from gpt2repro.model import GPT, GPTConfig

V, V_PADDED, C, N = 50, 64, 16, 37  # a padded vocabulary, and a token count no chunk size divides


def plain(hidden, weight, targets, vocab_size=V):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits[:, :vocab_size], targets, ignore_index=-1)


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V_PADDED, C, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[0, 5, 6, 36]] = -1  # ignored positions, one of them the last row of the last chunk
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, upstream=1.0):
    loss = fn(hidden, weight, targets)
    grads = torch.autograd.grad(loss * upstream, (hidden, weight))
    return loss.detach(), grads


def assert_rel_close(a, b, rel, name=""):
    """Largest difference relative to the largest entry: elementwise ratios of near-zero entries mean nothing."""
    error = ((a - b).abs().max() / b.abs().max()).item()
    assert error <= rel, f"{name}: {error:.2e} > {rel}"


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 64])
def test_loss_and_gradients_equal_the_full_logits_path_in_fp32(chunk_size):
    hidden, weight, targets = inputs()
    fused = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, V, chunk_size), hidden, weight, targets)
    oracle = loss_and_grads(plain, hidden, weight, targets)
    assert fused[0].item() == pytest.approx(oracle[0].item(), rel=1e-6)
    for got, want in zip(fused[1], oracle[1], strict=True):
        assert_rel_close(got, want, 1e-6)
    assert fused[1][1][V:].abs().max() == 0  # padded rows of the weight: no gradient
    assert fused[1][0][targets == -1].abs().max() == 0  # ignored positions: no gradient


def test_upstream_gradient_scales_both_gradients_as_a_loss_scale_does():
    hidden, weight, targets = inputs(seed=1)
    fused = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, V, 8), hidden, weight, targets, 1024.0)
    oracle = loss_and_grads(plain, hidden, weight, targets, 1024.0)
    for got, want in zip(fused[1], oracle[1], strict=True):
        assert_rel_close(got, want, 1e-6)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, targets = inputs(seed=2)
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets, V, 7).item() == pytest.approx(
            plain(hidden, weight, targets).item(), rel=1e-6
        )


def test_an_eval_forward_costs_the_forward_flops_only():
    """Under no_grad the lm_head weight is still a Parameter (requires_grad): no gradient work may follow from it."""
    from torch.utils.flop_counter import FlopCounterMode

    config = GPTConfig(vocab_size=1000, block_size=32, n_layer=2, n_head=2, n_embd=64, pad_vocab_multiple=64)
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, 1000, (4, 32))
    flops = {}
    for fused in (True, False):
        model.fused_loss = fused
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(idx, idx, return_logits=False)
        flops[fused] = counter.get_total_flops()
    assert flops[True] == flops[False], flops  # the logits' matmul, chunked, and nothing else


def test_every_target_ignored_gives_nan_like_cross_entropy():
    hidden, weight, _ = inputs(seed=3)
    targets = torch.full((N,), -1)
    assert torch.isnan(linear_cross_entropy(hidden, weight, targets, V, 8))
    assert torch.isnan(plain(hidden, weight, targets))


def test_bfloat16_autocast_matches_the_plain_path_to_bf16_rounding():
    hidden, weight, targets = inputs(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, V, 8), hidden, weight, targets)
        oracle = loss_and_grads(plain, hidden, weight, targets)
    assert fused[0].dtype == torch.float32  # the softmax runs in fp32
    assert fused[0].item() == pytest.approx(oracle[0].item(), rel=1e-2)
    for got, want in zip(fused[1], oracle[1], strict=True):
        assert got.dtype == want.dtype == torch.float32
        assert_rel_close(got, want, 2e-2)


def test_compiled_equals_eager():
    hidden, weight, targets = inputs(seed=5)

    def fused(h, w, t):
        return linear_cross_entropy(h, w, t, V, 8)

    eager = loss_and_grads(fused, hidden, weight, targets)
    compiled = loss_and_grads(torch.compile(fused, fullgraph=True), hidden, weight, targets)
    assert compiled[0].item() == pytest.approx(eager[0].item(), rel=1e-6)
    for got, want in zip(compiled[1], eager[1], strict=True):
        assert_rel_close(got, want, 1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpt_training_loss_and_every_gradient_equal_the_plain_path(checkpointing):
    # GPT-2's own layout: vocabulary padded to a multiple of 64, lm_head tied to wte.
    config = GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32, pad_vocab_multiple=64)
    torch.manual_seed(0)
    model = GPT(config)
    model.activation_checkpointing = checkpointing
    x = torch.randint(0, 300, (3, 16))
    y = torch.randint(0, 300, (3, 16))
    y[1, 4:9] = -1
    results = {}
    for fused in (True, False):
        model.fused_loss = fused
        model.zero_grad(set_to_none=True)
        logits, loss = model(x, y, return_logits=False)
        assert logits is None
        loss.backward()
        results[fused] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    for name, grad in results[False][1].items():
        assert_rel_close(results[True][1][name], grad, 1e-6, name)
    _, full = model(x, y)  # return_logits=True keeps minGPT's (logits, loss) with the plain loss
    assert full.item() == pytest.approx(results[False][0], rel=1e-6)
