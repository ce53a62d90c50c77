"""llm.c's model files, both ways: gpt2_124M.bin, gpt2_124M_bf16.bin and the model_NNNNNNNN.bin
checkpoints every llm.c run writes (github.com/karpathy/llm.c: train_gpt2.py write_model writes
them, train_gpt2.c gpt2_build_from_checkpoint and train_gpt2.cu read them).

    header      256 x int32: magic 20240326, version (3: float32, 5: bfloat16), max_seq_len,
                vocab_size, num_layers, num_heads, channels, padded_vocab_size; the rest zero
    parameters  in this fixed order, all in the version's dtype, little-endian:
                wte (padded_vocab_size, C), its rows past vocab_size zero; wpe (max_seq_len, C);
                then each of these stacked over the layers: ln_1 weight, ln_1 bias, c_attn weight
                (3C, C), c_attn bias, attn c_proj weight (C, C), its bias, ln_2 weight, ln_2 bias,
                c_fc weight (4C, C), c_fc bias, mlp c_proj weight (C, 4C), its bias; then ln_f
                weight and bias

The matrices are in nn.Linear's (out, in) layout, as this project's GPT holds them (not Hugging
Face's transposed Conv1D). llm.c pads the vocabulary to a multiple of 128 when it writes one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gpt2repro.model import GPTConfig
from gpt2repro.shards import atomic_file

MAGIC = 20240326
VERSIONS = {3: "float32", 5: "bfloat16"}
HEADER_INTS = 256
PAD_VOCAB_TO = 128  # llm.c's padded_vocab_size: the vocabulary rounded up to this
# The per-layer tensors, in file order: each is written for every layer before the next one.
LAYER_TENSORS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)


class LlmcError(ValueError):
    """A file that is not an llm.c model this project can read, or a model it cannot write as one."""


def is_llmc(path: str | os.PathLike) -> bool:
    """Whether the file starts with llm.c's model magic."""
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and int.from_bytes(head, "little") == MAGIC


def _names(n_layer: int) -> list[str]:
    """Every tensor's name in file order (this project's, and nanoGPT's, parameter names)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    names += [f"transformer.h.{i}.{t}" for t in LAYER_TENSORS for i in range(n_layer)]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def read_header(path: str | os.PathLike) -> tuple[GPTConfig, str, int]:
    """(the network, its dtype, padded_vocab_size) from the header; an LlmcError names what is wrong."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_INTS * 4)
    if len(raw) < HEADER_INTS * 4:
        raise LlmcError(f"{path} is {path.stat().st_size} bytes, shorter than llm.c's 1024-byte model header.")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, max_t, vocab, n_layer, n_head, channels, padded = (int(v) for v in header[:8])
    if magic != MAGIC:
        raise LlmcError(f"{path} is not an llm.c model file (magic {magic}, expected {MAGIC}).")
    if version not in VERSIONS:
        raise LlmcError(
            f"{path} is llm.c model version {version}; this reads versions 3 (float32) and 5 (bfloat16), "
            "which llm.c's train_gpt2.py and train_gpt2.cu write."
        )
    if padded < vocab:
        raise LlmcError(f"{path}: padded_vocab_size {padded} is smaller than vocab_size {vocab} (corrupt header).")
    try:
        config = GPTConfig(vocab_size=vocab, block_size=max_t, n_layer=n_layer, n_head=n_head, n_embd=channels)
    except ValueError as e:
        raise LlmcError(
            f"{path} has an impossible model header: {str(e).removeprefix('Invalid GPTConfig: ')}"
        ) from None
    return config, VERSIONS[version], padded


def _shapes(config: GPTConfig, padded: int) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in the file (llm.c's fill_in_parameter_sizes), by name."""
    C = config.n_embd
    per_layer = {
        "ln_1.weight": (C,),
        "ln_1.bias": (C,),
        "attn.c_attn.weight": (3 * C, C),
        "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C),
        "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,),
        "ln_2.bias": (C,),
        "mlp.c_fc.weight": (4 * C, C),
        "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (C, 4 * C),
        "mlp.c_proj.bias": (C,),
    }
    shapes = {"transformer.wte.weight": (padded, C), "transformer.wpe.weight": (config.block_size, C)}
    shapes |= {f"transformer.h.{i}.{t}": per_layer[t] for t in LAYER_TENSORS for i in range(config.n_layer)}
    return shapes | {"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}


def read(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor], str]:
    """(the network, its full state dict in float32 on the CPU with lm_head tied, the file's dtype). The
    vocabulary comes back unpadded (vocab_size rows); the file must be exactly as long as its header says."""
    path = Path(path)
    config, dtype, padded = read_header(path)
    shapes = _shapes(config, padded)
    itemsize = 4 if dtype == "float32" else 2
    expected = HEADER_INTS * 4 + itemsize * sum(int(np.prod(s)) for s in shapes.values())
    size = path.stat().st_size
    if size != expected:
        kind = "is truncated" if size < expected else "has trailing bytes"
        raise LlmcError(
            f"{path} is {size:,} bytes but its header ({config.n_layer} layers, {config.n_embd} channels, "
            f"{padded} vocabulary rows, {dtype}) needs {expected:,}: it {kind}."
        )
    # Memory-mapped: each tensor is read once, into its own float32 copy (a 1558M file never sits twice in memory).
    flat = np.memmap(path, dtype="<f4" if dtype == "float32" else "<u2", mode="r", offset=HEADER_INTS * 4)
    state, at = {}, 0
    for name in _names(config.n_layer):
        n = int(np.prod(shapes[name]))
        values = np.array(flat[at : at + n])
        if dtype == "bfloat16":  # a bfloat16 is the top half of a float32: widening is exact
            values = (values.astype(np.uint32) << 16).view(np.float32)
        state[name] = torch.from_numpy(values.astype(np.float32, copy=False)).view(shapes[name])
        at += n
    state["transformer.wte.weight"] = state["transformer.wte.weight"][: config.vocab_size].clone()
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return config, state, dtype


def write(state: dict[str, torch.Tensor], config: GPTConfig, path: str | os.PathLike, dtype: str = "float32") -> None:
    """Write a GPT's weights (its state dict, any padded vocabulary rows dropped and re-padded to llm.c's
    multiple of 128 with zeros) as an llm.c model file, atomically. bfloat16 rounds to nearest even."""
    if dtype not in VERSIONS.values():
        raise LlmcError(f"llm.c model files hold float32 or bfloat16, not {dtype}.")
    if not config.bias:
        raise LlmcError("llm.c's GPT-2 has biases; a model with bias=False cannot be written as an llm.c model.")
    padded = (config.vocab_size + PAD_VOCAB_TO - 1) // PAD_VOCAB_TO * PAD_VOCAB_TO
    version = next(v for v, name in VERSIONS.items() if name == dtype)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [
        MAGIC,
        version,
        config.block_size,
        config.vocab_size,
        config.n_layer,
        config.n_head,
        config.n_embd,
        padded,
    ]
    shapes = _shapes(config, padded)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(path), "wb") as f:
        f.write(header.tobytes())
        for name in _names(config.n_layer):
            tensor = state[name].detach().to("cpu", torch.float32)
            if name == "transformer.wte.weight":
                rows = torch.zeros(shapes[name])
                rows[: config.vocab_size] = tensor[: config.vocab_size]
                tensor = rows
            if tuple(tensor.shape) != shapes[name]:
                raise LlmcError(f"{name} has shape {tuple(tensor.shape)}, llm.c's layout needs {shapes[name]}.")
            if dtype == "bfloat16":
                f.write(tensor.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes())
            else:
                f.write(tensor.contiguous().numpy().astype("<f4").tobytes())
