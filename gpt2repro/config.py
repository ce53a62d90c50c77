"""The run's config: TrainConfig, every component's settings composed into one flat, typed dataclass.

Each component owns its settings, their checks and what its autos settle to, beside the code that uses them
(the batch's in batch.py, the schedule's in schedule.py, the guard's in guard.py, ...; gpt2repro/schema.py says
what a setting is). TrainConfig is their composition: one flat namespace of fields, as nanoGPT names them, which
is what a config file, a run's config.json and the command line (gpt2repro/cli.py) hold. Presets are in
presets.py.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from gpt2repro import schema
from gpt2repro.batch import BatchSettings, resolve_batch
from gpt2repro.checkpoint import CheckpointSettings
from gpt2repro.distributed import ClusterSettings
from gpt2repro.evaluate import EvalSettings
from gpt2repro.forecast import TuneSettings
from gpt2repro.ft import FaultToleranceSettings
from gpt2repro.guard import GuardSettings
from gpt2repro.metrics import LoggingSettings
from gpt2repro.model import ModelSettings
from gpt2repro.optim import OptimizerSettings
from gpt2repro.parallel import ParallelSettings
from gpt2repro.precision import PrecisionSettings
from gpt2repro.profiling import ProfilingSettings
from gpt2repro.schedule import ScheduleSettings

# The components, in the order --help lists them and settle() settles them (precision before the parallel
# plan and the MFU peak, which depend on the dtype).
COMPONENTS = (
    ModelSettings,
    BatchSettings,
    ScheduleSettings,
    OptimizerSettings,
    PrecisionSettings,
    ParallelSettings,
    CheckpointSettings,
    EvalSettings,
    GuardSettings,
    ClusterSettings,
    FaultToleranceSettings,
    LoggingSettings,
    ProfilingSettings,
    TuneSettings,
)


@dataclass(frozen=True)
class TrainConfig(*reversed(COMPONENTS)):  # reversed: a dataclass lists its last base's fields first
    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def problems(self) -> list[str]:
        """Every component's problems, and every value outside its choices or below its least value."""
        return schema.check(self) + [p for component in COMPONENTS for p in component.problems(self)]

    def settled(self, machine) -> TrainConfig:
        """Every component's autos, settled for machine in turn (gpt2repro/settings.py)."""
        cfg = self
        for component in COMPONENTS:
            cfg = cfg.replace(**component.settled(cfg, machine))
        return cfg


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Whether a field may change on resume is its own metadata (`resumable`).
RESUMABLE = frozenset(name for name, f in FIELDS.items() if f.metadata["resumable"])
# The fields whose auto settle() decides; the batch split is settled too, but from the global batch.
AUTO_SETTINGS = frozenset(name for name, f in FIELDS.items() if f.metadata["auto"])
# Keys a run's own config.json holds besides the fields (so that it can be passed back as --config):
# the launch, the data, and "requested", the settings as asked where they differ from what ran.
RUN_KEYS = ("world_size", "data", "dataset", "requested")


# The command line's own flags (gpt2repro/cli.py): they say where the run is, and no config file holds them.
LAUNCH_FLAGS = ("config", "data", "out", "world_size", "gpus_per_node")


def unknown_field_message(name: str) -> str:
    if name in LAUNCH_FLAGS:
        return f"{name} is not a field but a flag of the command line (--{name}); pass it there"
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.5)
    hint = f"; did you mean --{close[0]}?" if close else "; run with --help to list the fields"
    return f"unknown field --{name}{hint}"


def sentence(prefix: str, problems: list[str]) -> str:
    """One error line: the prefix, then every problem, with one final full stop."""
    text = prefix + "; ".join(problems)
    return text if text.endswith((".", "?")) else text + "."


def convert(pairs: list[tuple[str, object]], convert_one) -> tuple[dict, list[str]]:
    """{name: convert_one(field, raw)} for each pair, and one problem per unknown name or bad value."""
    values, problems = {}, []
    for name, raw in pairs:
        if name not in FIELDS:
            problems.append(unknown_field_message(name))
            continue
        try:
            values[name] = convert_one(FIELDS[name], raw)
        except ValueError as e:
            problems.append(str(e))
    return values, problems


def as_asked_again(values: dict, source: str) -> dict:
    """A config file's fields as a new run asks them. A run's own config.json holds what settled on its machine,
    and under "requested" what was asked where settling changed it: each auto setting that was asked ("auto",
    0) is asked again, to settle for the machine and the run now (a CPU prototype's file trains on the GPU; an
    H100's gets float16 on a V100; wsd's decay follows a new --max_steps); what the user fixed stays. The batch
    split is not undone: settling it again for another world size keeps the run's global batch (resolve_batch)."""
    if "requested" not in values:
        return values
    requested = values["requested"]
    if not isinstance(requested, dict):
        raise ValueError(f'Invalid {source}: "requested" must be an object of fields as asked, got {requested!r}.')
    if unknown := [unknown_field_message(name) for name in requested if name not in FIELDS]:
        raise ValueError(sentence(f'Invalid {source}: in "requested", ', unknown))
    return {**values, **{name: value for name, value in requested.items() if name in AUTO_SETTINGS}}


def from_json(values: dict, source: str) -> TrainConfig:
    """The TrainConfig of a JSON object of fields (a config file, a run's config.json, a checkpoint's
    meta.json); a field it lacks (added since it was written) has its default."""
    fields_, problems = convert([(k, v) for k, v in values.items() if k not in RUN_KEYS], schema.json_value)
    if problems:
        raise ValueError(sentence(f"Invalid {source}: ", problems))
    return TrainConfig(**fields_)


def resolve(cfg: TrainConfig, world_size: int, given: frozenset[str] = frozenset()) -> TrainConfig:
    """Derive the batch (resolve_batch) and check everything; one ValueError lists all problems."""
    problems = []
    try:
        cfg = resolve_batch(cfg, world_size, given)
    except ValueError as e:
        problems.append(str(e))
    problems += cfg.problems()
    if problems:
        raise ValueError(sentence("Invalid training config: ", problems))
    return cfg
