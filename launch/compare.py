"""Compare loss curves of runs with each other, with GPT-2 and with the references: a PNG and tables.

    python launch/compare.py runs/124m runs/124m-lr2x --baseline gpt2-124m --out compare.png
    python launch/compare.py runs/350m --baseline gpt2-124m gpt2-350m --log_x --csv table.csv --out c.png
    python launch/compare.py runs/llmc --reference llmc-124m-fineweb10B gpt2-124m@fineweb --log_x --out v.png

--reference overlays references (gpt2repro/references.py: a curve, a GPT-2 checkpoint's val
loss, or another run directory); the first curve among them judges every eval of each run
(ahead / on track / behind / diverging) and projects when the run reaches --target (default:
GPT-2 124M's val loss on the run's dataset).

Baselines are the published GPT-2 numbers unless a baselines file measured by
`launch/eval.py --hf` exists (--baselines, or DATA/baselines.json of the first run's data).
"""

import argparse
import csv
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2repro.runtime import require_torch, underscored  # noqa: E402

require_torch()  # one clear line on a torch older than the package needs, before anything imports it

from gpt2repro import compare, references, rundir  # noqa: E402
from gpt2repro.references import PUBLISHED_BASELINES, load_baselines  # noqa: E402


def default_baselines_file(run_dir: str) -> Path | None:
    data = (rundir.read_config(run_dir) or {}).get("data")
    return Path(data) / "baselines.json" if data and (Path(data) / "baselines.json").is_file() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument(
        "--baseline",
        nargs="*",
        default=None,
        help=f"of {', '.join(PUBLISHED_BASELINES)} (default gpt2-124m, none with --reference)",
    )
    p.add_argument("--baselines", help="measured baselines file (launch/eval.py --hf)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument("--log_x", action="store_true", help="log-scaled tokens axis")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA weight for the train loss (0: none)")
    p.add_argument(
        "--reference", nargs="*", default=[], help=f"of {', '.join(references.registry())}, or run directories"
    )
    p.add_argument("--target", help="the val loss to project to, a reference name (default: gpt2-124m@DATASET)")
    args = p.parse_args(underscored(sys.argv[1:] if argv is None else argv))
    if args.baseline is None:  # OpenWebText's GPT-2 124M, unless references say what to compare with
        args.baseline = [] if args.reference else ["gpt2-124m"]
    try:
        unknown = [b for b in args.baseline if b not in PUBLISHED_BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(PUBLISHED_BASELINES)}.")
        if not 0 <= args.smoothing < 1:
            raise ValueError("--smoothing must be in [0, 1).")
        runs = [compare.read_run(r) for r in args.runs]
        refs = [references.get(name) for name in args.reference]
        target = references.get(args.target) if args.target else None
        if target is not None and target.is_curve:
            raise ValueError(f"--target {args.target} is a curve; pass a single val loss, e.g. gpt2-124m@fineweb.")
        baselines = load_baselines(args.baselines or default_baselines_file(args.runs[0]))
        rows = compare.table(runs, baselines, args.baseline)
        compare.plot(runs, baselines, args.baseline, args.out, args.log_x, args.smoothing, refs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(compare.format_table(rows, args.baseline))
    curve = next((r for r in refs if r.is_curve), None)
    for run in runs if curve else []:
        goal = target or references.default_target(run.dataset or curve.dataset)
        evals, sentence = compare.verdicts(run, curve, goal)
        print(f"\n{run.name} against {curve.label}:\n{compare.format_verdicts(evals, curve)}\n{sentence}")
    print(f"wrote {args.out}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
