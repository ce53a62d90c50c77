"""Sample text from a trained checkpoint (or a run directory's newest checkpoint).

python launch/sample.py --ckpt runs/shakespeare --prompt "ROMEO:" --max-new-tokens 200
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiktoken  # noqa: E402
import torch  # noqa: E402

from gpt2repro.checkpoint import CheckpointError, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (its newest)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    try:
        model = load_model(args.ckpt)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    enc = tiktoken.get_encoding("gpt2")
    idx = torch.tensor([enc.encode_ordinary(args.prompt)], dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, generator=generator)
        print(f"--- sample {i + 1} ---\n{enc.decode(out[0].tolist())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
