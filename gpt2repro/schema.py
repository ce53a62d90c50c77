"""What a setting is: a field of the run's config that carries its meaning and the facts that are checked from it.

Each component declares its settings beside the code that uses them, as a frozen dataclass of `setting(...)`
fields (the schedule's in schedule.py, the guard's in guard.py, ...); gpt2repro/config.py composes them into
TrainConfig. From the fields alone come the command line and its --help (gpt2repro/cli.py), the flag reference
(docs/flags.md), the type of every value a config file may hold, and the checks that need no code: choices and
least values. A component adds its own checks in `problems()` and settles its autos in `settled()`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import ClassVar

SWITCH = ("auto", "true", "false")  # a setting taken as auto | true | false; a config file may hold it as a boolean


def setting(
    default,
    help: str,
    *,
    resumable: bool = False,
    auto: bool = False,
    choices: tuple[str, ...] = (),
    at_least: float | None = None,
    metavar: str = "",
):
    """A field of the run's config.

    help: one line of meaning (the --help line and the flag reference).
    resumable: may change when a run resumes (a longer run, another launch, logging, layout, memory trades);
        every other field must match the run's config.json.
    auto: its "auto" (or 0) is settled for the machine and the run (gpt2repro/settings.py); a run's config.json
        holds what it settled to, and under "requested" the auto that was asked, which settles again when the
        file is reused as --config (on the next machine, or with another --max_steps or --lr).
    choices, at_least: checked for every config, with one sentence each.
    """
    metadata = {"help": help, "resumable": resumable, "auto": auto, "choices": choices, "at_least": at_least}
    return field(default=default, metadata=metadata | {"metavar": metavar})


class Settings:
    """A component's settings. TITLE names its group in --help and the flag reference."""

    TITLE: ClassVar[str] = ""

    def problems(self) -> list[str]:
        """What is wrong with these settings beyond their choices and least values, one sentence each."""
        return []

    def settled(self, machine) -> dict:
        """The values its autos settle to on machine (a devices.Machine), as field changes; called on the run's
        whole config, once the components before it in config.COMPONENTS are settled."""
        return {}


def declared(component: type) -> list[dataclasses.Field]:
    """The fields a component declares itself (not those of the components it is composed with)."""
    own = component.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(component) if f.name in own]


def check(cfg) -> list[str]:
    """The problems every setting's own facts show: a value outside its choices or below its least value."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, least, choices = getattr(cfg, f.name), f.metadata.get("at_least"), f.metadata.get("choices")
        if choices and value not in choices:
            problems.append(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        elif least is not None and not value >= least:  # NaN fails too
            problems.append(f"{f.name} must be at least {least:g}, got {value}")
    return problems


def type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def parse_value(f: dataclasses.Field, raw: str):
    """A command-line value for field f (ints may be written as 5e5 or 1_000, booleans as true/1/yes)."""
    kind = type_name(f)
    if kind == "bool":
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--{f.name} takes true or false, got {raw!r}")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            pass
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not value.is_integer():
            raise ValueError(f"--{f.name} takes an integer, got {raw!r}")
        return int(value)
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"--{f.name} takes a number, got {raw!r}") from None
    return raw


def json_value(f: dataclasses.Field, value):
    """A config file's value for field f, type-checked (ints may be written as 5e3 or 5000.0; a switch as a
    boolean)."""
    kind = type_name(f)
    if f.metadata.get("choices") == SWITCH and isinstance(value, bool):
        return "true" if value else "false"
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    if kind == "float" and not isinstance(value, bool) and isinstance(value, (int, float)):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    expected = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[kind]
    raise ValueError(f"{f.name} must be {expected}, got {value!r}")


def to_json(cfg) -> dict:
    """cfg's fields as a config file holds them: settled switches as booleans (json_value reads them back)."""
    values = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("choices") == SWITCH and values[f.name] in ("true", "false"):
            values[f.name] = values[f.name] == "true"
    return values
