"""Sample text from a trained checkpoint (or a run directory's newest) or a Hugging Face GPT-2.

    python launch/sample.py --ckpt runs/shakespeare --prompt "ROMEO:" --max_new_tokens 200
    python launch/sample.py --hf gpt2 --prompt_file prompt.txt --num_samples 3 --top_k 50 --seed 7

Generation keeps a KV cache, so each new token costs one position, not the whole context.
The same seed gives the same text.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2repro.runtime import require_torch, underscored  # noqa: E402

require_torch()  # one clear line on a torch older than the package needs, before anything imports it

import torch  # noqa: E402

from gpt2repro.checkpoint import CheckpointError  # noqa: E402
from gpt2repro.tokenizer import gpt2  # noqa: E402
from gpt2repro.weights import load_model  # noqa: E402


def read_prompt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--prompt_file {path}: {e.strerror or e}; pass a UTF-8 text file.") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompt_file {path} is not UTF-8 text.") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint directory, or a run directory (its newest)")
    source.add_argument("--hf", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl, or a save_pretrained directory")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    prompt.add_argument("--prompt_file", type=Path, help="a UTF-8 text file to continue")
    p.add_argument("--num_samples", type=int, default=1, help="samples to draw (default 1)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens per sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature, > 0 (default 0.8)")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k likeliest tokens (default 200)")
    p.add_argument("--seed", type=int, default=1337, help="the sampling's seed (default 1337)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if any")
    args = p.parse_args(underscored(sys.argv[1:] if argv is None else argv))
    least = {"num_samples": 1, "max_new_tokens": 1, "top_k": 1}
    if bad := [f"--{name} must be at least {n}" for name, n in least.items() if getattr(args, name) < n]:
        p.error("; ".join(bad))
    if not args.temperature > 0:
        p.error(f"--temperature must be above 0, got {args.temperature}")
    try:
        text = read_prompt(args.prompt_file) if args.prompt_file else args.prompt
        model, _ = load_model(args.hf or args.ckpt)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model.eval().to(args.device)
    enc = gpt2()
    ids = enc.encode_ordinary(text) or [enc.eot_token]
    idx = torch.tensor([ids[-model.config.block_size :]], dtype=torch.long, device=args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    for i in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, generator=generator)
        print(f"--- sample {i + 1} ---\n{enc.decode(out[0].tolist())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
