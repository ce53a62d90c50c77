"""Parity with transformers' GPT-2, the independent oracle for the model's math."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpt2repro.model import GPT, GPTConfig  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=211, n_positions=32, n_embd=48, n_layer=3, n_head=4, bos_token_id=None, eos_token_id=None
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Random biases and norms too, so that a wrong map of any tensor shows.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return path, model


def test_logits_match_transformers(hf_dir):
    path, hf = hf_dir
    ours = GPT.from_pretrained(path).eval()
    x = torch.randint(0, 211, (4, 32))
    with torch.no_grad():
        expected = hf(x).logits
        got, _ = ours(x)
    assert (got - expected).abs().max() <= 1e-5


def test_greedy_generation_matches_transformers(hf_dir):
    path, hf = hf_dir
    ours = GPT.from_pretrained(path).eval()
    x = torch.randint(0, 211, (2, 6))
    expected = hf.generate(x, max_new_tokens=20, do_sample=False, pad_token_id=0)
    got = ours.generate(x, 20, do_sample=False)
    assert torch.equal(got, expected)


def test_padded_vocab_import_keeps_logits(hf_dir):
    path, hf = hf_dir
    ours = GPT.from_pretrained(path, pad_vocab_multiple=64).eval()
    assert ours.transformer.wte.weight.shape[0] == 256
    x = torch.randint(0, 211, (2, 10))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max() <= 1e-5


def test_export_round_trip_into_transformers(tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(vocab_size=150, block_size=24, n_layer=2, n_head=2, n_embd=32, pad_vocab_multiple=64)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 150, (3, 24))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max() <= 1e-5
    assert not list(tmp_path.glob("*.tmp"))


def test_directory_without_weights_is_a_clear_error(tmp_path, hf_dir):
    with pytest.raises(ValueError, match="holds no config.json"):
        GPT.from_pretrained(tmp_path)
    path, _ = hf_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="holds no GPT-2 weights"):
        GPT.from_pretrained(tmp_path)


def test_not_a_gpt2_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not GPT-2"):
        GPT.from_pretrained(tmp_path)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a directory nor a GPT-2 hub name"):
        GPT.from_pretrained("gpt3-175b")
