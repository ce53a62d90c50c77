import dataclasses

import pytest
import torch

from gpt2repro.model import GPT, GPTConfig


def tiny_config(**kw) -> GPTConfig:
    return GPTConfig(**{"vocab_size": 101, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw})


def test_gpt2_124m_parameter_count():
    model = GPT(GPTConfig.from_preset("gpt2-124m"))
    assert model.num_params() == 124_439_808


def test_presets_match_gpt2_shapes():
    shapes = {
        name: (c.n_layer, c.n_head, c.n_embd)
        for name, c in ((n, GPTConfig.from_preset(n)) for n in ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m"))
    }
    assert shapes == {
        "gpt2-124m": (12, 12, 768),
        "gpt2-350m": (24, 16, 1024),
        "gpt2-774m": (36, 20, 1280),
        "gpt2-1558m": (48, 25, 1600),
    }


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="gpt2-124m"):
        GPTConfig.from_preset("gpt2-125m")


def test_causality():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    x = torch.randint(0, 101, (2, 16))
    t = 9
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 101
    with torch.no_grad():
        lx, _ = model(x)
        ly, _ = model(y)
    assert torch.equal(lx[:, :t], ly[:, :t])
    assert not torch.allclose(lx[:, t], ly[:, t])


def test_padded_vocabulary_leaves_loss_and_logits_unchanged():
    torch.manual_seed(0)
    plain = GPT(tiny_config())
    padded = GPT(tiny_config(pad_vocab_multiple=64))
    assert padded.transformer.wte.weight.shape[0] == 128
    with torch.no_grad():
        padded.transformer.wte.weight[:101].copy_(plain.transformer.wte.weight)
        padded.transformer.wte.weight[101:].fill_(50.0)  # huge padded logits must not matter
        for name, p in plain.named_parameters():
            if name != "transformer.wte.weight":
                dict(padded.named_parameters())[name].copy_(p)
    x = torch.randint(0, 101, (2, 16))
    y = torch.randint(0, 101, (2, 16))
    lp, loss_p = plain(x, y)
    lq, loss_q = padded(x, y)
    assert lq.shape == lp.shape == (2, 16, 101)
    torch.testing.assert_close(loss_q, loss_p, rtol=0, atol=1e-6)
    generated = padded.generate(x[:, :4], 12, do_sample=True, generator=torch.Generator().manual_seed(1))
    assert int(generated.max()) < 101


def test_weight_tying_and_init():
    model = GPT(GPTConfig.from_preset("gpt-nano"))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 3) ** 0.5) < 0.002
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002


def test_optim_groups_decay_only_matrices():
    model = GPT(tiny_config())
    decay, no_decay = model.optim_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_group = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n_group == model.num_params()


def test_flops_per_token_matches_palm_formula():
    model = GPT(GPTConfig.from_preset("gpt2-124m"))
    n = 124_439_808 - 1024 * 768  # wpe is a lookup, not a matmul
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 1024 * 768


def test_ignore_index_targets():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = torch.randint(0, 101, (1, 8))
    y = torch.randint(0, 101, (1, 8))
    y_masked = y.clone()
    y_masked[0, :4] = -1
    logits, loss = model(x, y_masked)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], y[0, 4:])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GPTConfig(n_embd=100, n_head=3), "divisible by n_head"),
        (lambda: GPT(tiny_config())(torch.zeros(1, 17, dtype=torch.long)), "exceeds the model's block_size"),
        (lambda: GPT(tiny_config())(torch.full((1, 4), 101)), r"Token ids must lie in \[0, 101\)"),
        (lambda: GPT(tiny_config())(torch.full((1, 4), -3)), "Token ids must lie"),
        (lambda: dataclasses.replace(tiny_config(), dropout=1.5), "dropout"),
    ],
)
def test_bad_input_raises_one_clear_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sample_top_k_1_equals_greedy():
    from gpt2repro.utils import sample

    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = torch.randint(0, 101, (3, 5))
    greedy = sample(model, x, steps=20, sample=False)
    top1 = sample(model, x, steps=20, sample=True, top_k=1)
    assert greedy.shape == (3, 25)
    assert torch.equal(greedy, top1)
    assert model.training  # sample() restores the mode it found


def test_kv_cached_generation_equals_uncached():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()  # block_size 16: the 30 new tokens slide past it
    x = torch.randint(0, 101, (3, 5))
    cached = model.generate(x, 30, do_sample=False)
    uncached = model.generate(x, 30, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # The cached logits of a step equal a full forward pass over the same context.
    cache = []
    model(x, kv_cache=cache)
    step_logits, _ = model(cached[:, 5:6], kv_cache=cache)
    full_logits, _ = model(cached[:, :6])
    torch.testing.assert_close(step_logits[:, -1], full_logits[:, -1], rtol=1e-5, atol=1e-5)
    sampled = [model.generate(x, 30, generator=torch.Generator().manual_seed(4), use_cache=c) for c in (True, False)]
    assert torch.equal(*sampled)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_leaves_loss_and_gradients_unchanged(dropout):
    config = GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=100, dropout=dropout)
    idx = torch.randint(0, 100, (4, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(config)
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)  # the same dropout masks: recomputation must replay them, not draw new ones
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    assert ckpt_loss == plain_loss
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=0, msg=name)
