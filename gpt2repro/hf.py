"""Hugging Face GPT-2 files, beside llm.c's (gpt2repro/llmc.py): a save_pretrained directory (config.json and
model.safetensors, or pytorch_model.bin) read into our parameter names and written from them.

Our names are GPT-2's (transformer.wte, transformer.h.N.attn.c_attn, ...), so a file maps by name plus a
transpose: transformers stores four of each block's Linear weights as Conv1D, (in, out). GPT.from_pretrained
and GPT.save_pretrained (gpt2repro/model.py) are built on these; weights.py opens any source through them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gpt2repro.shards import atomic_file, atomic_path
from gpt2repro.tokenizer import EOT_ID

HF_NAMES = {"gpt2": "gpt2-124m", "gpt2-medium": "gpt2-350m", "gpt2-large": "gpt2-774m", "gpt2-xl": "gpt2-1558m"}
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def locate(name_or_dir: str | os.PathLike) -> Path:
    """A save_pretrained directory, or the hub's files of a GPT-2 name ("gpt2", ...), downloaded once."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if str(name_or_dir) not in HF_NAMES:
        raise ValueError(
            f"{str(name_or_dir)!r} is neither a directory nor a GPT-2 hub name; "
            f"pass a save_pretrained directory or one of: {', '.join(HF_NAMES)}."
        )
    from huggingface_hub import snapshot_download  # the [hf] extra, needed only to download

    return Path(snapshot_download(str(name_or_dir), allow_patterns=["config.json", "*.safetensors*"]))


def read_config(path: Path) -> dict:
    """The directory's config.json, checked to describe the GPT-2 this package implements."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} holds no config.json; pass a directory written by save_pretrained.")
    cfg = json.loads(config_file.read_text())
    if cfg.get("model_type") != "gpt2":
        raise ValueError(f"{config_file} describes a {cfg.get('model_type')!r} model, not GPT-2 ('gpt2').")
    unsupported = {
        "activation_function": ("gelu_new", cfg.get("activation_function", "gelu_new")),
        "layer_norm_epsilon": (1e-5, cfg.get("layer_norm_epsilon", 1e-5)),
        "scale_attn_weights": (True, cfg.get("scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": (False, cfg.get("scale_attn_by_inverse_layer_idx", False)),
        "n_inner": (None, cfg.get("n_inner")),
    }
    bad = [f"{k}={got!r} (need {want!r})" for k, (want, got) in unsupported.items() if got != want]
    if cfg.get("n_inner") == 4 * cfg.get("n_embd", -1):
        bad = [b for b in bad if not b.startswith("n_inner")]
    if bad:
        raise ValueError(f"{config_file} uses GPT-2 variants this model does not implement: {', '.join(bad)}.")
    return cfg


def read_shape(path: Path) -> dict:
    """The directory's model shape as GPTConfig fields."""
    cfg = read_config(path)
    return {
        "vocab_size": cfg["vocab_size"],
        "block_size": cfg["n_positions"],
        "n_layer": cfg["n_layer"],
        "n_head": cfg["n_head"],
        "n_embd": cfg["n_embd"],
        "bias": True,
    }


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The directory's tensors, by transformers' names."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(f))
        return state
    bin_file = path / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ValueError(
        f"{path} holds no GPT-2 weights (model.safetensors or pytorch_model.bin); "
        "pass a directory written by save_pretrained."
    )


def copy_into(own: dict[str, torch.Tensor], hf_state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy transformers' tensors into our state dict's (a model's own tensors, under torch.no_grad), transposing
    the Conv1D weights; the padded vocabulary rows are zeroed (never used by the loss or sampling)."""
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    for name, tensor in own.items():
        if name == "lm_head.weight":
            continue  # tied to wte
        key = name.removeprefix("transformer.")
        if key not in hf_state:
            raise ValueError(f"{source} holds no tensor {key!r}; it is not a complete GPT-2 checkpoint.")
        value = hf_state[key]
        if name.endswith(CONV1D_SUFFIXES):
            value = value.t()
        if name == "transformer.wte.weight":
            tensor[: value.size(0)].copy_(value)
            tensor[value.size(0) :].zero_()
            continue
        if value.shape != tensor.shape:
            raise ValueError(
                f"Tensor {key!r} in {source} has shape {tuple(value.shape)}, expected "
                f"{tuple(tensor.shape)} from its config.json; the directory is inconsistent."
            )
        tensor.copy_(value)


def from_ours(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our state dict as transformers' float32 tensors: lm_head left to be re-tied, the vocabulary's padding cut,
    the Conv1D weights transposed."""
    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied: transformers re-ties lm_head to wte
        if name == "transformer.wte.weight":
            tensor = tensor[:vocab_size]
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return tensors


def write(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], shape: dict) -> None:
    """config.json and model.safetensors that transformers.GPT2LMHeadModel loads; shape: vocab_size, block_size,
    n_layer, n_head, n_embd and dropout."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_eot = shape["vocab_size"] > EOT_ID  # <|endoftext|> only exists in GPT-2's own vocabulary
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": shape["vocab_size"],
        "n_positions": shape["block_size"],
        "n_ctx": shape["block_size"],
        "n_embd": shape["n_embd"],
        "n_layer": shape["n_layer"],
        "n_head": shape["n_head"],
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": shape["dropout"],
        "embd_pdrop": shape["dropout"],
        "attn_pdrop": shape["dropout"],
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "bos_token_id": EOT_ID if has_eot else None,
        "eos_token_id": EOT_ID if has_eot else None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_file(out_dir / "config.json", "w") as f:
        f.write(json.dumps(hf_config, indent=2) + "\n")
