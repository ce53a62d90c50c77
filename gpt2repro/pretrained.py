"""Starting a run from existing weights (nanoGPT's init_from): OpenAI's GPT-2 by hub name, a
Hugging Face GPT-2 directory, a file from launch/export.py, or a checkpoint (or run directory)
of this trainer. The new run starts at step 0 with a fresh optimizer; the network's shape is
the source's, and block_size may only crop it (as nanoGPT's crop_block_size).

One rank per job reads the source (its shape, then its weights) and hands the rest what they
need over the process group: at 64 ranks of 1558M, reading it everywhere would be terabytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from gpt2repro import checkpoint
from gpt2repro import distributed as D
from gpt2repro.config import TrainConfig
from gpt2repro.errors import first_line
from gpt2repro.model import GPT, HF_NAMES, PRESETS, GPTConfig, _read_hf_config

SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias")


def _kind(init_from: str) -> str:
    """ "export" (a file), "hf" (a directory with a GPT-2 config.json), "checkpoint" (ours, or a run
    directory), or "hub" (a GPT-2 name)."""
    path = Path(init_from)
    if path.is_file():
        return "export"
    if path.is_dir():
        config = path / "config.json"  # a run directory has one too, of training fields
        is_hf = config.is_file() and "model_type" in json.loads(config.read_text())
        return "hf" if is_hf else "checkpoint"
    if init_from in HF_NAMES:
        return "hub"
    raise ValueError(
        f"--init_from {init_from!r} is neither a file, a directory nor a GPT-2 name ({', '.join(HF_NAMES)}); "
        "pass an exported .pt, a Hugging Face directory, a checkpoint or a run directory."
    )


def source_config(init_from: str) -> GPTConfig:
    """The source's network shape from its small files (meta.json, config.json; an exported file's
    pickled config, memory-mapped): no weights read, nothing hashed."""
    kind = _kind(init_from)
    if kind == "export":
        return GPTConfig(**checkpoint.read_export(Path(init_from))["config"])
    if kind == "hf":
        hf = _read_hf_config(Path(init_from))
        return GPTConfig(hf["vocab_size"], hf["n_positions"], hf["n_layer"], hf["n_head"], hf["n_embd"])
    if kind == "checkpoint":
        return GPTConfig(**checkpoint.read_meta(checkpoint.newest_complete(init_from))["model"])
    return PRESETS[HF_NAMES[init_from]]


def _on_rank0(fn, info: D.DistInfo | None, *args, share: bool = True):
    """fn(*args) on rank 0 alone. Its ValueError is raised on every rank; its result is returned on
    every rank when `share` (a small object, broadcast), else on rank 0 only (None elsewhere)."""
    result = error = None
    if info is None or info.is_main:
        try:
            result = fn(*args)
        except ValueError as e:
            error = str(e)
    if info is not None and info.is_distributed:
        shared, error = D.broadcast_object((result if share else None, error), info)
        result = shared if share else result
    if error:
        raise ValueError(error)
    return result


def with_source_shape(cfg: TrainConfig, given: frozenset[str] = frozenset(), info: D.DistInfo | None = None
                      ) -> TrainConfig:  # fmt: skip
    """cfg with the network shape of cfg.init_from (read by rank 0 only, given info); a typed shape
    flag that disagrees is an error."""
    source = _on_rank0(source_config, info, cfg.init_from)
    conflicts = [f"--{f} {getattr(cfg, f)} (the source has {getattr(source, f)})"
                 for f in SHAPE_FIELDS if f in given and getattr(cfg, f) != getattr(source, f)]  # fmt: skip
    if "block_size" in given and cfg.block_size > source.block_size:
        conflicts.append(f"--block_size {cfg.block_size} (the source's is {source.block_size}; it can only crop)")
    if conflicts:
        raise ValueError(f"--init_from {cfg.init_from} fixes the model's shape: drop {', '.join(conflicts)}.")
    block_size = cfg.block_size if "block_size" in given else source.block_size
    return cfg.replace(**{f: getattr(source, f) for f in SHAPE_FIELDS}, block_size=block_size)


def load_into(model: GPT, init_from: str, info: D.DistInfo) -> None:
    """Fill `model` (whole, or this rank's shards under FSDP) with the source's weights. Rank 0 alone
    reads the source and holds its full state dict on the CPU; the other ranks receive theirs by
    broadcast, each keeping only its shards."""
    weights = _on_rank0(load_weights, info, init_from, model.config, share=False)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.is_distributed)
    set_model_state_dict(model, weights or {}, options=options)


def load_weights(init_from: str, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The source's full state dict in `config`'s shape: vocabulary padded, positions cropped."""
    kind = _kind(init_from)
    if kind in ("export", "checkpoint"):
        model = checkpoint.load_model(init_from)
    else:
        try:
            model = GPT.from_pretrained(init_from)
        except (OSError, ImportError) as e:  # a hub name without network, or no huggingface_hub
            raise ValueError(
                f"could not load {init_from!r} ({first_line(e)}); download it where there is network "
                "(GPT.from_pretrained(name).save_pretrained(dir)) and pass that directory."
            ) from None
    state = model.state_dict()
    wte = state["transformer.wte.weight"]
    padded = torch.zeros(config.padded_vocab_size, wte.size(1), dtype=wte.dtype)
    padded[: config.vocab_size] = wte[: config.vocab_size]  # padded rows: never used by loss or sampling
    state["transformer.wte.weight"] = state["lm_head.weight"] = padded  # tied
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: config.block_size].clone()
    return state
