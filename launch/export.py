"""Consolidate a (sharded) training checkpoint into one file and/or a Hugging Face directory.

    python launch/export.py --ckpt runs/774m --pt gpt2-774m.pt
    python launch/export.py --ckpt runs/774m/checkpoints/step_00050000 --hf export/gpt2-774m

--ckpt takes a checkpoint directory or a run directory (its newest intact checkpoint); the
checkpoint may have been written by any number of ranks, DDP or FSDP. One process, no GPU
needed. --pt writes {"config", "model", "step", "tokens"} (torch.load, weights_only=True),
which launch/eval.py and launch/sample.py accept as --ckpt. --hf writes config.json +
model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2repro.runtime import require_torch  # noqa: E402

require_torch()  # one clear line on a torch older than the package needs, before anything imports it

import torch  # noqa: E402

from gpt2repro import checkpoint, weights  # noqa: E402
from gpt2repro.shards import atomic_file  # noqa: E402


def write_single_file(model, about: weights.About, out: Path) -> None:
    """Atomically: a kill mid-write leaves no file that looks complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        "step": about.step,
        "tokens": about.tokens,
        "dtype": about.dtype,  # what it trained in: launch/eval.py evaluates in the same
    }
    with atomic_file(out, "wb") as f:
        torch.save(blob, f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory, or run directory (its newest checkpoint)")
    p.add_argument("--pt", help="write one consolidated file here")
    p.add_argument("--hf", help="write a Hugging Face GPT-2 directory here")
    args = p.parse_args(argv)
    if not (args.pt or args.hf):
        p.error("give --pt FILE, --hf DIR or both")
    try:
        if weights.kind_of(args.ckpt) != "checkpoint":
            raise ValueError(f"--ckpt {args.ckpt} is not a checkpoint or run directory of this trainer.")
        model, about = weights.load_model(args.ckpt)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{about.path}: step {about.step}, {about.tokens:,} tokens, {model.num_params():,} parameters, "
        f"written by {about.world_size} rank(s) ({about.run.strategy})"
    )
    if args.pt:
        write_single_file(model, about, Path(args.pt))
        print(f"wrote {args.pt}")
    if args.hf:
        model.save_pretrained(args.hf)
        print(f"wrote {args.hf} (config.json, model.safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
