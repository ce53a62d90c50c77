"""GPT-2's tokenizer, offline: tiktoken's "gpt2" encoding built from BPE ranks shipped in the package.

tiktoken.get_encoding("gpt2") downloads GPT-2's vocab.bpe and encoder.json on first use,
which fails on the many cluster nodes that have no internet. The same 50,256 merges ship
here as assets/gpt2.tiktoken (OpenAI's r50k_base ranks, MIT licensed; sha256 checked), so
data prep, sampling, eval and HellaSwag never touch the network or TIKTOKEN_CACHE_DIR.
No torch here: data_prep imports this module.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

RANKS_FILE = Path(__file__).with_name("assets") / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenizer (tiktoken's r50k_pat_str: the regex of GPT-2's encoder.py, made faster).
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.cache
def gpt2() -> tiktoken.Encoding:
    """The GPT-2 encoding, identical to tiktoken.get_encoding("gpt2"), with no download."""
    data = RANKS_FILE.read_bytes()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise ValueError(f"{RANKS_FILE} is damaged (sha256 mismatch); reinstall gpt2repro.")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(
        name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={EOT: EOT_ID}, explicit_n_vocab=50257
    )
