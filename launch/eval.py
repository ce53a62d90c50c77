"""Evaluate a checkpoint or a Hugging Face GPT-2: val loss (and perplexity), HellaSwag, lm-eval's tasks.

    python launch/eval.py --ckpt runs/124m --data data/owt                  # newest checkpoint of a run
    python launch/eval.py --hf gpt2 --data data/owt                          # live GPT-2 baseline
    python launch/eval.py --ckpt runs/124m --hellaswag hellaswag_val.jsonl
    python launch/eval.py --ckpt runs/124m --tasks lambada_openai,hellaswag,wikitext --vs gpt2-124m   # GPT-2's table
    torchrun --standalone --nproc_per_node=8 launch/eval.py --hf gpt2-xl --data data/owt

The loss uses the trainer's val windows (the first --max_tokens of the split, in
non-overlapping block_size windows); for a checkpoint --max_tokens defaults to its run's
eval_tokens, so the result reproduces the val_loss logged at that step. --hf results are
also saved to DATA/baselines.json (or --baselines), which launch/compare.py prefers over
the published numbers; --tasks results of --hf go to the same file, which --vs prefers over the
published figures of OpenAI's checkpoints.
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2repro.runtime import require_torch, underscored  # noqa: E402

require_torch()  # one clear line on a torch older than the package needs, before anything imports it

import torch  # noqa: E402

from gpt2repro import checkpoint, evaluate, parallel, references, weights, zero_shot  # noqa: E402
from gpt2repro import distributed as D  # noqa: E402
from gpt2repro.data import DataError, EvalWindows  # noqa: E402
from gpt2repro.errors import failure_message, print_error  # noqa: E402
from gpt2repro.model import GPT  # noqa: E402
from gpt2repro.precision import precision  # noqa: E402
from gpt2repro.shards import ShardError, read_manifest, write_json_atomic  # noqa: E402

DEFAULT_EVAL_TOKENS = 10_485_760


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint directory, or a run directory (its newest checkpoint)")
    source.add_argument("--hf", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl, or a save_pretrained directory")
    p.add_argument("--data", help="prepared dataset directory")
    p.add_argument("--split", default="val")
    p.add_argument("--max_tokens", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument(
        "--compile",
        default="false",
        choices=("true", "false"),
        help="torch.compile the model for the val loss, as training's evaluations run on a GPU (with "
        "training's --batch_size too, the same computation as its logged val_loss)",
    )
    p.add_argument("--hellaswag", help="HellaSwag jsonl (ctx, endings, label): llm.c's completion style")
    p.add_argument(
        "--tasks", help="lm-eval tasks, comma-separated (lambada_openai,hellaswag,...; needs gpt2repro[eval])"
    )
    p.add_argument("--task_data", help="local files for tasks: TASK=FILE,... (json, jsonl, parquet, csv); no download")
    p.add_argument("--task_dir", action="append", default=[], help="a directory of your own lm-eval task YAMLs")
    p.add_argument("--limit", type=int, help="the first N documents of each task only")
    p.add_argument("--vs", help="print the tasks beside GPT-2's own figures: gpt2-124m | gpt2-350m | ...")
    p.add_argument("--out", help="result JSON (default: next to the checkpoint, or printed only)")
    p.add_argument(
        "--baselines",
        help="baselines file for --hf results and --vs (default DATA/baselines.json, else ./baselines.json)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="autocast dtype; auto: the run's own (a checkpoint), else bfloat16 on a GPU",
    )
    args = p.parse_args(underscored(sys.argv[1:] if argv is None else argv))
    if not args.data and not args.hellaswag and not args.tasks:
        p.error("pass --data DIR (loss), --hellaswag FILE and/or --tasks TASK,...")
    if args.vs and not args.tasks:
        p.error("--vs compares lm-eval tasks: pass --tasks too")
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    return args


def load_model(args) -> tuple[GPT, weights.About, int, Path | None]:
    """(model, where it came from, default eval tokens, default result file), through weights.load_model."""
    model, about = weights.load_model(args.hf or args.ckpt)  # the run's own loss, else where it pays here
    eval_tokens = (about.run or {}).get("eval_tokens", DEFAULT_EVAL_TOKENS)  # the run's val_loss used these
    path = Path(about.path)
    result_file = {
        "checkpoint": path / f"eval_{args.split}.json",
        "export": path.with_name(f"{path.stem}.eval_{args.split}.json"),
    }.get(about.kind)
    return model, about, eval_tokens, result_file


def check_vocab(model: GPT, data_dir: str) -> None:
    manifest = read_manifest(data_dir)
    if manifest and manifest["vocab_size"] > model.config.vocab_size:
        raise ValueError(
            f"The model's vocab_size {model.config.vocab_size} does not cover {data_dir}'s tokenizer "
            f"({manifest['tokenizer']}, {manifest['vocab_size']} ids); evaluate it on data of its own tokenizer."
        )


def main(argv=None) -> int:
    info = None
    try:
        args = parse(argv)
        if args.tasks:  # lm-eval is an extra: one clear line without it, before any model is read
            from gpt2repro import harness  # noqa: F401
        with D.distributed_context(args.device) as info:
            model, about, default_tokens, result_file = load_model(args)
            model.to(info.device)
            _, autocast = precision(args.dtype, info.device_type, about.dtype)  # as asked, else the run's own
            result = {"model": args.hf or about.path}
            replicas = parallel.layout("ddp", info)  # every rank holds the whole model and takes a share
            if args.data:
                check_vocab(model, args.data)
                max_tokens = args.max_tokens or default_tokens
                block = model.config.block_size
                windows = EvalWindows(args.data, args.split, block, max_tokens, model.config.vocab_size)
                evaluated = torch.compile(model) if args.compile == "true" else model
                loss = evaluate.val_loss(evaluated, windows, args.batch_size, replicas, autocast)
                result.update(
                    data=args.data,
                    split=args.split,
                    num_tokens=len(windows) * block,
                    loss=loss,
                    perplexity=evaluate.perplexity(loss),
                )
            if args.hellaswag:
                examples = evaluate.read_hellaswag(args.hellaswag)
                result["hellaswag"] = evaluate.hellaswag(model, examples, replicas, autocast)
            if args.tasks:
                result.update(lm_eval_tasks(args, model, about, info))
            if info.is_main:
                report(args, result, args.out or result_file)
        return 0
    except (ValueError, ImportError, DataError, ShardError, checkpoint.CheckpointError) as e:
        print_error(e, info)  # from every rank that fails, not only rank 0
        return 1
    except RuntimeError as e:
        message = failure_message(e, D.backend_timeout_s(600.0))
        if message is None:
            raise
        print_error(message, info)
        return 1


def lm_eval_tasks(args, model: GPT, about: weights.About, info: D.DistInfo) -> dict:
    """lm-eval's results for --tasks, each rank scoring a share of the documents (rank 0 gets them all)."""
    from gpt2repro import harness

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    lm = harness.GPT2ReproLM(
        model=model, batch_size=args.batch_size, device=info.device, dtype=args.dtype, trained_in=about.dtype
    )
    results = harness.run_tasks(lm, tasks, harness.parse_task_data(args.task_data), args.limit, task_dirs=args.task_dir)
    if results is None:  # not rank 0
        return {}
    from lm_eval.utils import make_table

    print(make_table(results))
    return {"tasks": harness.scores(results), "tasks_stderr": harness.scores(results, stderr=True)}


def baselines_path(args) -> Path:
    """Where --hf results go, and --vs reads them: --baselines, else DATA/baselines.json, else ./baselines.json."""
    return Path(args.baselines or (Path(args.data) / "baselines.json" if args.data else "baselines.json"))


def report(args, result: dict, out: str | Path | None) -> None:
    if "loss" in result:
        print(
            f"{result['model']}: {args.split} loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
            f"over {result['num_tokens']:,} tokens"
        )
    if "hellaswag" in result:
        h = result["hellaswag"]
        print(f"{result['model']}: HellaSwag acc {h['acc']:.4f}, acc_norm {h['acc_norm']:.4f} ({h['num_examples']})")
    if args.vs and "tasks" in result:
        measured = zero_shot.read_measured(baselines_path(args), args.vs)
        rows = zero_shot.table(result["tasks"], args.vs, measured, result["tasks_stderr"])
        print(zero_shot.format_table(rows, args.vs))
    if out:
        write_json_atomic(out, result)
    if args.hf and "tasks" in result:
        path = baselines_path(args)
        table = json.loads(path.read_text()) if path.is_file() else {}
        name = references.HF_TO_BASELINE.get(args.hf, Path(args.hf).name)
        table.setdefault(name, {}).setdefault("tasks", {}).update(result["tasks"])
        write_json_atomic(path, table)
        print(f"saved {name}'s task scores to {path}")
    if args.hf and "loss" in result:
        path = baselines_path(args)
        table = json.loads(path.read_text()) if path.is_file() else {}
        name = references.HF_TO_BASELINE.get(args.hf, Path(args.hf).name)
        row = table.setdefault(name, {})
        row[f"{args.split}_loss"] = result["loss"]
        if "hellaswag" in result:
            row["hellaswag"] = result["hellaswag"]["acc_norm"]
        write_json_atomic(path, table)
        print(f"saved {name} to {path}")


if __name__ == "__main__":
    sys.exit(main())
