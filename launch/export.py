"""Write a model as one file, a Hugging Face directory or an llm.c model file.

    python launch/export.py --ckpt runs/774m --pt gpt2-774m.pt
    python launch/export.py --ckpt runs/774m/checkpoints/step_00050000 --hf export/gpt2-774m
    python launch/export.py --ckpt runs/124m --llmc gpt2_124M.bin                      # llm.c's float32 file
    python launch/export.py --ckpt runs/124m --llmc gpt2_124M_bf16.bin --llmc_dtype bfloat16
    python launch/export.py --ckpt llmc/log124M/model_00015000.bin --hf export/llmc-124m  # and back

--ckpt takes anything gpt2repro/weights.py opens: a checkpoint directory or a run directory (its
newest intact checkpoint, written by any number of ranks, DDP or FSDP), an exported .pt, an llm.c
model file, a Hugging Face directory or a GPT-2 name. One process, no GPU needed. --pt writes
{"config", "model", "step", "tokens", "dtype"} (torch.load, weights_only=True), which launch/eval.py
and launch/sample.py accept as --ckpt. --hf writes config.json + model.safetensors that
transformers' GPT2LMHeadModel.from_pretrained loads. --llmc writes the file llm.c's train_gpt2.c
(float32) and train_gpt2cu (either) load as their starting model (gpt2repro/llmc.py).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2repro.runtime import require_torch, underscored  # noqa: E402

require_torch()  # one clear line on a torch older than the package needs, before anything imports it

import torch  # noqa: E402

from gpt2repro import checkpoint, llmc, weights  # noqa: E402
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
    p.add_argument("--ckpt", required=True, help="the model: a checkpoint or run directory, .pt, llm.c .bin, HF dir")
    p.add_argument("--pt", help="write one consolidated file here")
    p.add_argument("--hf", help="write a Hugging Face GPT-2 directory here")
    p.add_argument("--llmc", help="write an llm.c model file here")
    p.add_argument(
        "--llmc_dtype", default="float32", choices=("float32", "bfloat16"), help="float32 (version 3) or bfloat16 (5)"
    )
    args = p.parse_args(underscored(sys.argv[1:] if argv is None else argv))
    if not (args.pt or args.hf or args.llmc):
        p.error("give --pt FILE, --hf DIR, --llmc FILE, or several")
    try:
        model, about = weights.load_model(args.ckpt)
        print(describe(model, about))
        if args.pt:
            write_single_file(model, about, Path(args.pt))
            print(f"wrote {args.pt}")
        if args.hf:
            model.save_pretrained(args.hf)
            print(f"wrote {args.hf} (config.json, model.safetensors)")
        if args.llmc:
            llmc.write(model.state_dict(), model.config, args.llmc, args.llmc_dtype)
            print(f"wrote {args.llmc} (llm.c model, {args.llmc_dtype})")
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def describe(model, about: weights.About) -> str:
    line = f"{about.path} ({about.kind}): {model.num_params():,} parameters"
    if about.step is not None:
        line += f", step {about.step}, {about.tokens:,} tokens"
    if about.run is not None:
        line += f", written by {about.world_size} rank(s) ({about.run.get('strategy', 'ddp')})"
    return line


if __name__ == "__main__":
    sys.exit(main())
