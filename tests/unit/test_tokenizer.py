"""The bundled GPT-2 tokenizer against tiktoken's own "gpt2" encoding (the oracle, offline
through ../shared's tiktoken cache where this team's workspace has one)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2repro.tokenizer import gpt2
from tests.conftest import SHAKESPEARE, SHARED

CACHE = SHARED / "tiktoken_cache"
EDGE_CASES = [
    "",
    "<|endoftext|>",  # a special token written as text: ordinary text to encode_ordinary
    "a<|endoftext|>b <|endoftext|> <|endoftext",
    "Hello, I'm a language model,",
    "  leading   and trailing   \n\n\t spaces  ",
    "'s 't 're 've 'm 'll 'd 'S 'LL",
    "数字 123 4567 ١٢٣ émigré naïve café 🤖🏖️ \u200b\x00",
    "\r\n" * 3 + "x" * 500,
]


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    if not CACHE.is_dir():
        pytest.skip(f"no tiktoken cache at {CACHE}: tiktoken.get_encoding('gpt2') would need the network")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(CACHE)
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def test_bundled_tokenizer_equals_tiktoken_on_the_demo_corpus(tiktoken_gpt2):
    text = SHAKESPEARE.read_text()
    ours = gpt2().encode_ordinary(text)
    assert ours == tiktoken_gpt2.encode_ordinary(text) and len(ours) > 300_000
    assert gpt2().decode(ours) == text


@pytest.mark.parametrize("text", EDGE_CASES)
def test_bundled_tokenizer_equals_tiktoken_on_edge_cases(tiktoken_gpt2, text):
    enc = gpt2()
    assert enc.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)
    assert enc.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert enc.encode(text, disallowed_special=()) == tiktoken_gpt2.encode(text, disallowed_special=())
    assert (enc.n_vocab, enc.eot_token) == (tiktoken_gpt2.n_vocab, tiktoken_gpt2.eot_token) == (50257, 50256)


def test_bundled_tokenizer_needs_no_network_and_no_cache(tmp_path):
    # An empty cache directory and no network: tiktoken.get_encoding("gpt2") would try to download.
    code = "from gpt2repro.tokenizer import gpt2; print(gpt2().encode_ordinary('Hello world'))"
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[15496, 995]"
    assert not any(Path(tmp_path).rglob("*"))
