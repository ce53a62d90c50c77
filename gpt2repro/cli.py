"""The training command line, built from the typed config: every field is a flag, and --help shows each with
its type, default and meaning, grouped by the component that owns it. docs/flags.md is the same reference,
written by `python -m gpt2repro.cli > docs/flags.md` (a test keeps it current).

`--config` takes a preset or a JSON file of fields (a run's config.json works too); `--field value` or
`--field=value` overrides one field. Flags are spelled with underscores, as config files are; every entry
point also takes the dashed spelling (`--batch-size`, runtime.underscored). Every problem is reported at once, in one
ValueError; an unknown flag names the closest valid one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2repro import config as C
from gpt2repro import schema
from gpt2repro.presets import PRESETS
from gpt2repro.runtime import underscored

USAGE = """examples:
  python launch/train.py --config shakespeare-cpu --data data/shakespeare --out runs/shk
  torchrun --standalone --nproc_per_node=8 launch/train.py --config gpt2-124m --data data/owt --out runs/124m
  python launch/train.py --config gpt2-1558m --dry_run true --world_size 8 --gpu_memory_gb 40   (memory plan)
  python launch/train.py --config gpt2-124m --data data/owt --out runs/124m --tune true  (time layouts, forecast)

Rerunning the same command resumes from the newest complete checkpoint in --out."""


def launch_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """The flags that are not fields: what to start from, where the data is and where the run goes."""
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        usage="%(prog)s --config PRESET|FILE [--data DIR --out DIR] [--FIELD VALUE ...]",
        description="Train GPT-2 on prepared shards: one process, torchrun on one node, or torchrun across nodes.",
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
        allow_abbrev=False,
    )
    g = p.add_argument_group("the run")
    g.add_argument(
        "--config",
        required=True,
        metavar="PRESET|FILE",
        help=f"a preset ({', '.join(PRESETS)}) or a JSON file of fields (a run's config.json works too)",
    )
    g.add_argument("--data", metavar="DIR", help="prepared dataset directory (data_prep/prepare.py)")
    g.add_argument("--out", metavar="DIR", help="run directory: config.json, metrics.jsonl, checkpoints")
    g.add_argument(
        "--world_size",
        type=int,
        default=0,
        metavar="N",
        help="with --dry_run true: plan for this many GPUs (default: this launch's ranks)",
    )
    g.add_argument(
        "--gpus_per_node",
        type=int,
        default=0,
        metavar="N",
        help="with --dry_run true: GPUs per node, for hsdp (default: --world_size, one node)",
    )
    return p


def groups() -> list[tuple[str, list]]:
    """(title, fields) per group, in the components' order; components that share a title share a group."""
    titled: dict[str, list] = {}
    for component in C.COMPONENTS:
        titled.setdefault(component.TITLE, []).extend(schema.declared(component))
    return list(titled.items())


def default_text(f) -> str:
    """The default as it is typed: "" quoted, booleans as true/false, 6e-4 as 0.0006."""
    if isinstance(f.default, str):
        return json.dumps(f.default)
    if isinstance(f.default, bool):
        return str(f.default).lower()
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def help_line(f) -> str:
    """The field's meaning, then its type or choices and its default."""
    kind = "|".join(f.metadata["choices"]) if f.metadata["choices"] else schema.type_name(f)
    return f"{f.metadata['help']} [{kind}; default {default_text(f)}]"


def parser() -> argparse.ArgumentParser:
    """launch_parser with every field, for --help."""
    p = launch_parser(add_help=True)
    for title, fields in groups():
        g = p.add_argument_group(title)
        for f in fields:
            g.add_argument(
                f"--{f.name}",
                metavar=f.metadata["metavar"] or schema.type_name(f).upper(),
                help=help_line(f).replace("%", "%%"),
            )
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, C.TrainConfig, frozenset[str]]:
    """(the launch's flags, the asked config, the fields typed): --help prints every flag and exits."""
    argv = underscored(argv)
    if "-h" in argv or "--help" in argv:
        parser().print_help()
        sys.exit(0)
    p = launch_parser()
    args, rest = p.parse_known_args(argv)
    cfg, given = parse_overrides(load_base(args.config), rest)
    if not cfg.dry_run and not (args.data and args.out):
        raise ValueError("--data and --out are required (except with --dry_run true).")
    if (args.world_size or args.gpus_per_node) and not cfg.dry_run:
        raise ValueError("--world_size and --gpus_per_node plan a launch: pass them with --dry_run true.")
    world_size, per_node = args.world_size, args.gpus_per_node
    if world_size < 0 or per_node < 0 or (per_node and world_size and world_size % per_node):
        raise ValueError(
            "--world_size and --gpus_per_node must be positive (0: this launch's), and the GPUs per node must divide "
            f"the world size; got {world_size} and {per_node}."
        )
    return args, cfg, given


def parse_overrides(base: C.TrainConfig, args: list[str]) -> tuple[C.TrainConfig, frozenset[str]]:
    """Apply `--field value` / `--field=value` pairs; collect every problem into one ValueError.

    Returns the config and the names of the fields given: those beat what a preset derives.
    """
    args = underscored(args)
    is_flag = lambda arg: arg.startswith("--") and arg[2:].partition("=")[0] in C.FIELDS
    pairs, problems = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r} (fields are given as --field value)")
            i += 1
            continue
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or is_flag(args[i + 1]):
                problems.append(f"--{name} needs a value")
                i += 1
                continue
            raw = args[i + 1]
            i += 1
        i += 1
        pairs.append((name, raw))
    changes, bad_values = C.convert(pairs, schema.parse_value)
    problems += bad_values
    if problems:
        raise ValueError(C.sentence("Invalid arguments: ", problems))
    return base.replace(**changes), frozenset(changes)


def load_base(name_or_file: str) -> C.TrainConfig:
    """A preset, or a JSON file of fields (a run's own config.json works too)."""
    if name_or_file in PRESETS:
        return PRESETS[name_or_file]
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(
            f"--config {name_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file that exists."
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config file {path} is not valid JSON: {e}.") from None
    if not isinstance(values, dict):
        raise ValueError(f'--config file {path} must hold one JSON object of fields, e.g. {{"lr": 3e-4}}.')
    return C.from_json(C.as_asked_again(values, f"config file {path}"), f"config file {path}")


def reference() -> str:
    """docs/flags.md: every flag of launch/train.py, by group, with its type, default and meaning."""
    lines = [
        "# launch/train.py's flags",
        "",
        "Generated from the config (`python -m gpt2repro.cli > docs/flags.md`); `tests/unit/test_cli.py` keeps it",
        "current. Every field is also a key of a config file and of a run's config.json. *resumable*: may change",
        "when a run resumes; *auto*: settled for the machine (gpt2repro/settings.py), and asked again when the",
        "run's config.json is reused as --config.",
        "",
    ]
    for title, fields in [("the run", None), *groups()]:
        lines += [f"## {title}", "", "| flag | type | default | meaning |", "|---|---|---|---|"]
        if fields is None:
            for action in launch_parser()._actions:
                metavar = action.metavar.replace("|", "\\|")
                lines.append(f"| `{action.option_strings[0]}` | {metavar} | | {action.help} |")
        for f in fields or ():
            kind = " \\| ".join(f.metadata["choices"]) if f.metadata["choices"] else schema.type_name(f)
            notes = [word for word in ("resumable", "auto") if f.metadata[word]]
            meaning = f.metadata["help"].replace("|", "\\|") + (f" *({', '.join(notes)})*" if notes else "")
            lines.append(f"| `--{f.name}` | {kind} | `{default_text(f)}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())
