"""One way to open weights: anything a user can point at, for eval, sample, export and init_from.

    open_weights(source) -> Weights(config, state, about)   the GPT's full state dict, on the CPU
    load_model(source)   -> (GPT in eval mode on the CPU, About)

A source is one of (`kind_of` decides, once):
    checkpoint  a checkpoint directory of this trainer, or a run directory (its newest intact one)
    export      a single file written by launch/export.py --pt
    llmc        an llm.c model file: gpt2_124M.bin, gpt2_124M_bf16.bin, model_NNNNNNNN.bin (gpt2repro/llmc.py)
    hf          a Hugging Face GPT-2 directory (save_pretrained)
    hub         a GPT-2 name: gpt2, gpt2-medium, gpt2-large, gpt2-xl

init_from (nanoGPT's) builds on the same: the new run starts at step 0 with a fresh optimizer, the
network's shape is the source's (`with_source_shape`; block_size may only crop it, as nanoGPT's
crop_block_size), and one rank per job reads the source and hands the rest what they need over the
process group (`load_into`): at 64 ranks of 1558M, reading it everywhere would be terabytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from gpt2repro import checkpoint, hf, llmc
from gpt2repro import distributed as D
from gpt2repro.errors import first_line
from gpt2repro.hf import HF_NAMES
from gpt2repro.model import GPT, MODEL_FIELDS, PRESETS, GPTConfig, with_tied, without_tied

KINDS = ("checkpoint", "export", "llmc", "hf", "hub")
NOT_A_MODEL = "neither a model file written by launch/export.py nor an llm.c model file"


@dataclass(frozen=True)
class About:
    """What is known of where the weights came from."""

    kind: str  # one of KINDS
    path: str  # the checkpoint directory (a run directory's newest), the file, the directory or the hub name
    step: int | None = None
    tokens: int | None = None
    dtype: str = "auto"  # the dtype it trained in; auto: unknown (OpenAI's, or too old a checkpoint to say)
    run: dict | None = None  # the run's settled config, as its checkpoint's meta.json holds it (checkpoints)
    world_size: int | None = None  # how many ranks wrote it (checkpoints)


@dataclass
class Weights:
    config: GPTConfig
    state: dict[str, torch.Tensor]  # full tensors on the CPU, lm_head tied to wte
    about: About


def kind_of(source: str) -> str:
    """Which of KINDS source is; a ValueError naming what it accepts otherwise."""
    path = Path(source)
    if path.is_file():
        return "llmc" if llmc.is_llmc(path) else "export"
    if path.is_dir():
        config = path / "config.json"  # a run directory has one too, of training fields
        is_hf = config.is_file() and "model_type" in json.loads(config.read_text())
        return "hf" if is_hf else "checkpoint"
    if source in HF_NAMES:
        return "hub"
    raise ValueError(
        f"{source!r} is neither a file, a directory nor a GPT-2 name ({', '.join(HF_NAMES)}); "
        "pass an exported .pt, a Hugging Face directory, a checkpoint or a run directory."
    )


def shape_of(source: str) -> GPTConfig:
    """The source's network from its small files (meta.json, config.json; an exported file's pickled
    config, memory-mapped): no weights read, nothing hashed."""
    kind = kind_of(source)
    if kind == "export":
        return GPTConfig(**read_export(Path(source))["config"])
    if kind == "llmc":
        return llmc.read_header(source)[0]
    if kind == "hf":
        return GPTConfig(**hf.read_shape(Path(source)))
    if kind == "checkpoint":
        return GPTConfig(**checkpoint.read_meta(checkpoint.newest_complete(source))["model"])
    return PRESETS[HF_NAMES[source]]


def open_weights(source: str) -> Weights:
    """The weights of any source (a checkpoint is checked intact first, every file hashed once)."""
    kind = kind_of(source)
    if kind == "checkpoint":
        return _checkpoint_weights(checkpoint.resolve_path(source))
    if kind == "export":
        blob = read_export(Path(source))
        about = About(kind, source, blob.get("step"), blob.get("tokens"), blob.get("dtype", "auto"))
        return Weights(GPTConfig(**blob["config"]), with_tied(dict(blob["model"])), about)
    if kind == "llmc":
        config, state, stored = llmc.read(source)
        # A bfloat16 file comes from a bfloat16 run (train_gpt2.cu); a float32 one does not say.
        return Weights(config, state, About(kind, source, dtype="bfloat16" if stored == "bfloat16" else "auto"))
    try:
        model = GPT.from_pretrained(source)
    except (OSError, ImportError) as e:  # a hub name without network, or no huggingface_hub
        raise ValueError(
            f"could not load {source!r} ({first_line(e)}); download it where there is network "
            "(GPT.from_pretrained(name).save_pretrained(dir)) and pass that directory."
        ) from None
    return Weights(model.config, model.state_dict(), About(kind, source))


def load_model(source: str) -> tuple[GPT, About]:
    """The GPT of any source in eval mode on the CPU, computing its loss as its run did (fused or not)."""
    weights = open_weights(source)
    model = GPT(weights.config)
    model.load_state_dict(weights.state)
    fused = (weights.about.run or {}).get("fused_loss")  # settled: a boolean (a string in older checkpoints)
    if fused in (True, False, "true", "false"):
        model.fused_loss = fused in (True, "true")
    return model.eval(), weights.about


def _checkpoint_weights(path: Path) -> Weights:
    """A checkpoint directory that checkpoint.resolve_path has already checked (no second hashing)."""
    meta = checkpoint.read_meta(path)
    config = GPTConfig(**meta["model"])
    state = without_tied(GPT(config).state_dict())
    checkpoint.load_state(path, {"model": state})
    run = dict(meta["config"])
    # A checkpoint from before config records were settled kept what ran beside them.
    for name in ("dtype", "strategy"):
        if run.get(name, "auto") == "auto" and name in meta:
            run[name] = meta[name]
    dtype = run.get("dtype", "auto")
    about = About("checkpoint", str(path), meta["step"], meta["tokens"], dtype, run, meta["world_size"])
    return Weights(config, with_tied(state), about)


def read_export(path: Path) -> dict:
    """The single file launch/export.py writes (config, model, step, tokens, dtype), checked. Memory-mapped:
    reading its config costs nothing, and the weights are read once, when used."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise checkpoint.CheckpointError(f"{path} is {NOT_A_MODEL} ({first_line(e)}).") from None
    if not isinstance(blob, dict) or "model" not in blob or "config" not in blob:
        raise checkpoint.CheckpointError(f"{path} is {NOT_A_MODEL}.")
    return blob


# ----- init_from --------------------------------------------------------------------------------------


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


def with_source_shape(cfg, given: frozenset[str] = frozenset(), info: D.DistInfo | None = None):
    """cfg with the network shape of cfg.init_from (read by rank 0 only, given info); a typed shape
    flag that disagrees is an error. block_size may only crop the source's."""
    source = _on_rank0(_init_from_shape, info, cfg.init_from)
    fixed = [f for f in MODEL_FIELDS if f != "block_size"]
    conflicts = [
        f"--{f} {getattr(cfg, f)} (the source has {getattr(source, f)})"
        for f in fixed
        if f in given and getattr(cfg, f) != getattr(source, f)
    ]
    if "block_size" in given and cfg.block_size > source.block_size:
        conflicts.append(f"--block_size {cfg.block_size} (the source's is {source.block_size}; it can only crop)")
    if conflicts:
        raise ValueError(f"--init_from {cfg.init_from} fixes the model's shape: drop {', '.join(conflicts)}.")
    block_size = cfg.block_size if "block_size" in given else source.block_size
    return cfg.replace(**{f: getattr(source, f) for f in fixed}, block_size=block_size)


def _init_from_shape(source: str) -> GPTConfig:
    try:
        return shape_of(source)
    except ValueError as e:
        raise ValueError(f"--init_from {e}") from None


def load_into(model: GPT, source: str, info: D.DistInfo) -> None:
    """Fill `model` (whole, or this rank's shards under FSDP) with the source's weights. Rank 0 alone
    reads the source and holds its full state dict on the CPU; the other ranks receive theirs by
    broadcast, each keeping only its shards."""
    state = _on_rank0(fitted_state, info, source, model.config, share=False)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=info.is_distributed)
    set_model_state_dict(model, state or {}, options=options)


def fitted_state(source: str, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The source's full state dict in `config`'s shape: vocabulary padded, positions cropped."""
    state = open_weights(source).state
    wte = state["transformer.wte.weight"]
    padded = torch.zeros(config.padded_vocab_size, wte.size(1), dtype=wte.dtype)
    padded[: config.vocab_size] = wte[: config.vocab_size]  # padded rows: never used by loss or sampling
    state["transformer.wte.weight"] = state["lm_head.weight"] = padded  # tied
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: config.block_size].clone()
    return state
