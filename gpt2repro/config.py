"""Training configuration: one flat, typed dataclass, named presets, CLI overrides, validation.

Field names follow nanoGPT's where one exists. `--config` takes a preset name or a JSON
file; `--field value` / `--field=value` override single fields. Validation reports every
problem at once in one ValueError; an unknown field names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from gpt2repro.guard import MIN_HISTORY
from gpt2repro.model import GPTConfig, shape_problems


def resumable(default):
    """A field that may change when a run resumes (a longer run, another launch, logging, layout, memory
    trades); every other one must match the run's config.json."""
    return field(default=default, metadata={"resumable": True})


def auto_setting(default, resumable: bool = True):
    """A field whose "auto" (or 0) settings.settle decides for the machine and the run: a run's config.json holds
    what it settled to and, under "requested", the auto that was asked, which settles again when the file is
    reused as --config (on the next machine, or with another --max_steps or --lr)."""
    return field(default=default, metadata={"resumable": resumable, "auto_setting": True})


_SHAPE = GPTConfig()  # the model's fields and their defaults are GPTConfig's


@dataclass(frozen=True)
class TrainConfig:
    # model (GPTConfig's fields, with its defaults: GPT-2 124M)
    n_layer: int = _SHAPE.n_layer
    n_head: int = _SHAPE.n_head
    n_embd: int = _SHAPE.n_embd
    block_size: int = _SHAPE.block_size
    vocab_size: int = _SHAPE.vocab_size
    dropout: float = _SHAPE.dropout
    bias: bool = _SHAPE.bias
    # batch: batch_size is the per-rank micro-batch; total_batch_tokens (when > 0) derives
    # grad_accum_steps = total_batch_tokens / (batch_size * block_size * world_size); see resolve_batch
    batch_size: int = resumable(12)
    grad_accum_steps: int = resumable(1)
    total_batch_tokens: int = resumable(0)
    # optimisation
    optimizer: str = "adamw"  # adamw | muon: Muon for the blocks' matrices, AdamW for the rest (gpt2repro/optim.py)
    # --optimizer muon: the Muon matrices' peak lr (lr stays AdamW's; the schedule scales both); 0: twice lr,
    # the ratio benchmarks/optimizer_steps.py found best (README, Muon)
    muon_lr: float = auto_setting(0.0, resumable=False)
    max_steps: int = resumable(600_000)
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 2000
    lr_schedule: str = "cosine"  # cosine | constant | wsd (warmup-stable-decay)
    decay_steps: int = auto_setting(0)  # wsd: length of the final linear decay (0: 20% of max_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    max_nonfinite_steps: int = resumable(5)  # stop after this many consecutive non-finite steps
    # The loss-spike guard (gpt2repro/guard.py), on by default: skip the update of a step whose loss lies more than
    # spike_zscore noise units above the median of the last spike_window accepted steps (judged from the end of
    # the lr warmup; 0: off), or whose grad norm does by spike_grad_zscore (0: measured, not judged); after
    # rollback_after consecutive skips, roll back to the last checkpoint from before them and move the data past
    # them, at most max_rollbacks times. The thresholds: benchmarks/spike_guard.py's healthy and poisoned runs.
    spike_zscore: float = resumable(8.0)
    spike_grad_zscore: float = resumable(0.0)
    spike_window: int = 128  # llm.c's outlier detector's window
    rollback_after: int = resumable(32)
    max_rollbacks: int = resumable(3)
    # system
    dtype: str = auto_setting("auto", resumable=False)  # auto | float32 | bfloat16 | float16
    compile: str = auto_setting("auto")  # auto (on for CUDA) | true | false
    device: str = auto_setting("auto")  # auto | cpu | cuda
    # auto (when the planner says ddp does not fit: hsdp on several nodes, else fsdp) | ddp | fsdp | hsdp
    strategy: str = auto_setting("auto")
    activation_checkpointing: bool = resumable(False)
    # auto | true | false: the loss without the full logits (gpt2repro/loss.py); auto: on a CPU only
    fused_loss: str = auto_setting("auto")
    fp8: bool = resumable(False)  # the blocks' matmuls in float8 (torchao; GPUs with compute capability 8.9+)
    gpu_memory_gb: float = auto_setting(0.0)  # for the planner; 0: this GPU's memory (none on a CPU)
    collective_timeout_s: float = resumable(600.0)  # a rank silent this long inside a collective fails the job
    peak_tflops: float = auto_setting(0.0)  # accelerator's dense peak for MFU; 0: look the GPU up in a table
    seed: int = 1337
    # evaluation, logging, checkpoints
    eval_interval: int = resumable(1000)
    eval_tokens: int = resumable(10_485_760)  # 10 x 1M tokens = 10240 windows of 1024
    log_interval: int = resumable(10)
    ckpt_interval: int = resumable(1000)
    keep_ckpts: int = resumable(3)
    resume: str = resumable("auto")  # auto | never | PATH to a checkpoint
    init_from: str = ""  # start from these weights (gpt2..gpt2-xl, HF dir, exported .pt, checkpoint): step 0
    hellaswag_file: str = resumable("")
    # lm-eval tasks at evaluation time (gpt2repro/harness.py, needs gpt2repro[eval]): comma-separated names,
    # local data files for them (TASK=FILE,...; else the Hub's), the first eval_tasks_limit documents of each
    # (0: all), at every evaluation ("eval") or at the last step only ("end")
    eval_tasks: str = resumable("")
    eval_task_data: str = resumable("")
    eval_tasks_limit: int = resumable(500)
    eval_tasks_at: str = resumable("end")
    reference: str = resumable("")  # a val curve to judge each eval by (gpt2repro/references.py), or a run directory
    wandb: str = resumable("disabled")  # online | offline | disabled
    wandb_project: str = resumable("gpt2repro")
    wandb_run_name: str = resumable("")
    # profiling (gpt2repro/profiling.py): "A:B" traces steps A..B on every rank; stacks cost more
    profile_steps: str = resumable("")
    profile_with_stack: bool = resumable(False)
    dry_run: bool = resumable(False)
    # --tune true (gpt2repro/tune.py): time each layout that may fit for tune_steps steps after tune_warmup,
    # print the table, the fastest and the forecast, train nothing; tune_out: write the chosen layout there.
    # gpu_hour_cost: price of one GPU-hour, for the forecast's cost (0: none shown)
    tune: bool = resumable(False)
    tune_steps: int = resumable(5)
    tune_warmup: int = resumable(3)
    tune_out: str = resumable("")
    gpu_hour_cost: float = resumable(0.0)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
# The fields that define the network (and must match a checkpoint to load it): GPTConfig's weight fields.
MODEL_FIELDS = tuple(name for name in GPTConfig.weight_fields() if name in FIELD_TYPES)
# Whether a field may change on resume is its own metadata (`resumable`).
RESUMABLE = frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("resumable"))
# The fields whose auto settle() decides (`auto_setting`); the batch split is settled too, but from the global batch.
AUTO_SETTINGS = frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("auto_setting"))


def model_config(cfg: TrainConfig) -> GPTConfig:
    """The network cfg trains. 64-row padding of the vocabulary: faster lm_head matmuls, never part of the loss."""
    return GPTConfig(**{f: getattr(cfg, f) for f in MODEL_FIELDS}, dropout=cfg.dropout, pad_vocab_multiple=64)


def model_shape(preset: str) -> dict:
    """GPTConfig.from_preset(preset)'s shape as TrainConfig fields."""
    shape = GPTConfig.from_preset(preset)
    return {name: getattr(shape, name) for name in MODEL_FIELDS}


# GPT-2 on OpenWebText as nanoGPT's train_gpt2 config (600k steps, 2000 warmup, lr 6e-4) with
# GPT-3's 0.5M-token batch: 2**19 = 512 sequences of 1024, which 1 to 512 ranks (any power of
# two) split evenly; other world sizes get the nearest global batch they can split (resolve_batch).
_GPT2_124M = TrainConfig(**model_shape("gpt2-124m"), batch_size=16, total_batch_tokens=2**19)
_LLMC_124M = TrainConfig(
    **model_shape("gpt2-124m"),
    batch_size=64,
    total_batch_tokens=524_288,
    lr=6e-4,
    min_lr=0.0,
    warmup_steps=700,
    max_steps=18_865,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_interval=250,
    eval_tokens=10 * 2**20,
    ckpt_interval=5000,
    reference="llmc-124m-fineweb10B",
)
PRESETS: dict[str, TrainConfig] = {
    "gpt2-124m": _GPT2_124M,
    # GPT-3 paper, table 2.1: learning rates for the comparable sizes.
    "gpt2-350m": _GPT2_124M.replace(**model_shape("gpt2-350m"), lr=3e-4, min_lr=3e-5, batch_size=8),
    "gpt2-774m": _GPT2_124M.replace(**model_shape("gpt2-774m"), lr=2.5e-4, min_lr=2.5e-5, batch_size=4),
    "gpt2-1558m": _GPT2_124M.replace(**model_shape("gpt2-1558m"), lr=2e-4, min_lr=2e-5, batch_size=2),
    # llm.c's recipes, flag for flag (scripts/run_gpt2_*.sh): -b micro-batch, -d tokens per step, -l lr,
    # -q the lr's final fraction (0: decay to zero; nanoGPT keeps 10%), -u warmup, -x steps, -c weight
    # decay, -v eval interval, -n checkpoint interval; clip 1.0 and betas (0.9, 0.95) are llm.c's defaults,
    # val is the first 20 batches of 64 x 1024 x 8 ranks = 10 x 2**20 tokens.
    # 124M: FineWeb 10B (18,865 steps, 9.9B tokens), its curve is the llmc-124m-fineweb10B reference.
    "gpt2-124m-llmc": _LLMC_124M,
    # 350M and 774M: FineWeb 100B, 31.5B and 150B tokens.
    "gpt2-350m-llmc": _LLMC_124M.replace(
        **model_shape("gpt2-350m"), lr=3e-4, max_steps=60_000, ckpt_interval=2000, reference=""
    ),
    "gpt2-774m-llmc": _LLMC_124M.replace(
        **model_shape("gpt2-774m"), batch_size=32, lr=2.5e-4, max_steps=286_102, ckpt_interval=4000, reference=""
    ),
    # 1558M: FineWeb-Edu 100B, ~1M tokens per step, 32,000 steps (33.6B tokens), decay to 10%.
    "gpt2-1558m-llmc": _LLMC_124M.replace(
        **model_shape("gpt2-1558m"),
        batch_size=16,
        total_batch_tokens=1_048_576,
        lr=6e-4,
        min_lr=6e-5,
        max_steps=32_000,
        ckpt_interval=2000,
        reference="",
    ),
    # nanoGPT's config/finetune_shakespeare.py: OpenAI's weights (the shape comes from them),
    # 32 x 1024 tokens per step, 20 steps at a constant 3e-5. --init_from gpt2-xl as nanoGPT.
    "finetune-shakespeare": TrainConfig(
        init_from="gpt2",
        batch_size=1,
        grad_accum_steps=32,
        max_steps=20,
        lr=3e-5,
        min_lr=3e-5,
        warmup_steps=0,
        lr_schedule="constant",
        eval_interval=5,
        eval_tokens=40 * 1024,
        log_interval=1,
        ckpt_interval=20,
    ),
    # About three minutes on a 2-core CPU (3,700 tokens/s): 1.5 epochs of tiny Shakespeare in GPT-2
    # BPE. Measured there, at a fixed time budget, more small steps beat a wider model: n_embd 32
    # at micro-batch 8 (1300 steps) reached val 4.90 where n_embd 64 at 16 (500 steps) reached 5.22.
    "shakespeare-cpu": TrainConfig(
        n_layer=4,
        n_head=4,
        n_embd=32,
        block_size=64,
        batch_size=8,
        grad_accum_steps=1,
        max_steps=1300,
        lr=8e-3,
        min_lr=8e-4,
        warmup_steps=60,
        dropout=0.0,
        eval_interval=500,
        eval_tokens=16_384,
        log_interval=100,
        ckpt_interval=500,
        compile="false",
    ),
}


def _parse_value(name: str, raw: str):
    kind = FIELD_TYPES[name]
    if kind == "bool":
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--{name} takes true or false, got {raw!r}")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            pass
        try:  # 5e5 or 1_000 style
            value = float(raw)
        except ValueError:
            value = math.nan
        if not value.is_integer():
            raise ValueError(f"--{name} takes an integer, got {raw!r}")
        return int(value)
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"--{name} takes a number, got {raw!r}") from None
    return raw


def _unknown_field_message(name: str) -> str:
    close = difflib.get_close_matches(name, FIELD_TYPES, n=1, cutoff=0.5)
    hint = f"; did you mean --{close[0]}?" if close else "; run with --help to list the fields"
    return f"unknown field --{name}{hint}"


# Keys a run's own config.json holds besides the fields (so that it can be passed back as --config):
# the launch, the data, and "requested", the settings as asked where they differ from what ran.
RUN_KEYS = ("world_size", "data", "dataset", "requested")
# Settings taken as auto | true | false, written to a run's config.json as JSON booleans once settled.
SWITCHES = ("compile", "fused_loss")


def _json_value(name: str, value):
    """A config file's value for field `name`, type-checked (ints may be written as 5e3 or 5000.0)."""
    kind = FIELD_TYPES[name]
    if name in SWITCHES and isinstance(value, bool):
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
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def to_json(cfg: TrainConfig) -> dict:
    """cfg's fields as a config file holds them: settled switches as booleans (load_base reads them back)."""
    values = cfg.to_dict()
    for name in SWITCHES:
        if values[name] in ("true", "false"):
            values[name] = values[name] == "true"
    return values


def sentence(prefix: str, problems: list[str]) -> str:
    """One error line: the prefix, then every problem, with one final full stop."""
    text = prefix + "; ".join(problems)
    return text if text.endswith((".", "?")) else text + "."


def load_base(name_or_file: str) -> TrainConfig:
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
    return from_json(as_asked_again(values, f"config file {path}"), f"config file {path}")


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
    if unknown := [_unknown_field_message(name) for name in requested if name not in FIELD_TYPES]:
        raise ValueError(sentence(f'Invalid {source}: in "requested", ', unknown))
    return {**values, **{name: value for name, value in requested.items() if name in AUTO_SETTINGS}}


def from_json(values: dict, source: str) -> TrainConfig:
    """The TrainConfig of a JSON object of fields (a config file, a run's config.json, a checkpoint's
    meta.json); a field it lacks (added since it was written) has its default."""
    fields_, problems = _convert([(k, v) for k, v in values.items() if k not in RUN_KEYS], _json_value)
    if problems:
        raise ValueError(sentence(f"Invalid {source}: ", problems))
    return TrainConfig(**fields_)


def _convert(pairs: list[tuple[str, object]], convert) -> tuple[dict, list[str]]:
    """{name: convert(name, raw)} for each pair, and one problem per unknown name or bad value."""
    values, problems = {}, []
    for name, raw in pairs:
        if name not in FIELD_TYPES:
            problems.append(_unknown_field_message(name))
            continue
        try:
            values[name] = convert(name, raw)
        except ValueError as e:
            problems.append(str(e))
    return values, problems


def parse_overrides(base: TrainConfig, args: list[str]) -> tuple[TrainConfig, frozenset[str]]:
    """Apply `--field value` / `--field=value` pairs; collect every problem into one ValueError.

    Returns the config and the names of the fields given: those beat what a preset derives.
    """
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
            if i + 1 >= len(args):
                problems.append(f"--{name} needs a value")
                break
            raw = args[i + 1]
            i += 1
        i += 1
        pairs.append((name.replace("-", "_"), raw))
    changes, bad_values = _convert(pairs, _parse_value)
    problems += bad_values
    if problems:
        raise ValueError(sentence("Invalid arguments: ", problems))
    return base.replace(**changes), frozenset(changes)


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, min(n, at_most) + 1) if n % d == 0]


def resolve_batch(cfg: TrainConfig, world_size: int, given: frozenset[str] = frozenset()) -> TrainConfig:
    """Settle batch_size x grad_accum_steps x world_size x block_size = total_batch_tokens.

    Fields in `given` (typed on the command line) are kept as they are; the others, coming
    from a preset or a config file, bend to fit this world size: the micro-batch shrinks to
    one that divides each rank's share, and a preset's total becomes the nearest one the
    ranks can split. A ValueError says what cannot fit and which values would.
    """
    b, t, w = cfg.batch_size, cfg.block_size, world_size
    if min(b, t, w, cfg.grad_accum_steps) < 1:
        return cfg  # reported by resolve
    if "grad_accum_steps" in given:
        total = b * t * w * cfg.grad_accum_steps
        if "total_batch_tokens" in given and cfg.total_batch_tokens not in (0, total):
            raise ValueError(
                f"--grad_accum_steps {cfg.grad_accum_steps} and --total_batch_tokens {cfg.total_batch_tokens} "
                f"disagree: {b} x {t} x {w} ranks x {cfg.grad_accum_steps} = {total} tokens; give only one of them"
            )
        return cfg.replace(total_batch_tokens=total)
    if cfg.total_batch_tokens <= 0:
        return cfg.replace(total_batch_tokens=b * t * w * cfg.grad_accum_steps)
    if "total_batch_tokens" in given:  # exactly what was asked, or an error naming what would work
        sequences, rest = divmod(cfg.total_batch_tokens, t * w)
        if rest or sequences == 0:
            nearest = max(1, round(cfg.total_batch_tokens / (t * w))) * t * w
            raise ValueError(
                f"total_batch_tokens {cfg.total_batch_tokens} is not divisible by block_size x world_size = "
                f"{t} x {w} = {t * w}; use a multiple of it, e.g. {nearest}"
            )
        if "batch_size" not in given:
            b = _divisors(sequences, b)[-1]
        elif sequences % b:
            raise ValueError(
                f"total_batch_tokens {cfg.total_batch_tokens} is not divisible by batch_size x block_size x world_size "
                f"= {b} x {t} x {w} = {b * t * w}; batch sizes that divide it: {_divisors(sequences, 4 * b)}"
            )
        return cfg.replace(batch_size=b, grad_accum_steps=sequences // b)
    # A preset's total: exactly, with the largest micro-batch down to half the preset's; else the
    # largest micro-batch whose nearest evenly split global batch is within 10% of it (throughput
    # wants big micro-batches), else the micro-batch that comes closest.
    sequences = cfg.total_batch_tokens / t

    def split(m: int) -> tuple[int, float]:
        accum = max(1, round(sequences / (m * w)))
        return accum, abs(m * w * accum - sequences) / sequences

    options = [b] if "batch_size" in given else range(b, 0, -1)
    exact = next((m for m in options if m >= b / 2 and split(m)[1] == 0), None)
    best = exact or next((m for m in options if split(m)[1] <= 0.1), None) or min(options, key=lambda m: split(m)[1])
    accum = split(best)[0]
    return cfg.replace(batch_size=best, grad_accum_steps=accum, total_batch_tokens=best * t * w * accum)


def describe_batch(asked: TrainConfig, cfg: TrainConfig, world_size: int, given: frozenset[str] = frozenset()) -> str:
    """One line: the global batch and, where it differs from what was asked, what was derived from what;
    and a warning line of its own when a typed --batch_size moved a preset's step by more than 10%."""
    line = (
        f"batch: {cfg.total_batch_tokens:,} tokens per step = {cfg.batch_size} sequences x {cfg.block_size} tokens "
        f"x {world_size} rank(s) x {cfg.grad_accum_steps} accumulation steps"
    )
    notes = []
    if cfg.batch_size != asked.batch_size:
        notes.append(f"batch_size {asked.batch_size} -> {cfg.batch_size} to split the step evenly")
    if "grad_accum_steps" in given:
        if asked.total_batch_tokens not in (0, cfg.total_batch_tokens):
            notes.append(f"--grad_accum_steps given, so total_batch_tokens {asked.total_batch_tokens:,} is not used")
    elif asked.total_batch_tokens:
        if cfg.total_batch_tokens != asked.total_batch_tokens:
            notes.append(
                f"total_batch_tokens {asked.total_batch_tokens:,} -> {cfg.total_batch_tokens:,}, the "
                f"nearest that {world_size} rank(s) split evenly"
            )
        notes.append("grad_accum_steps derived from total_batch_tokens")
    line += f" ({'; '.join(notes)})" if notes else ""
    asked_total, total = asked.total_batch_tokens, cfg.total_batch_tokens
    typed = "batch_size" in given and not given & {"total_batch_tokens", "grad_accum_steps"}
    if typed and asked_total and abs(total - asked_total) > 0.1 * asked_total:
        line += (
            f"\nwarning: --batch_size {cfg.batch_size} on {world_size} rank(s) makes each step {total:,} tokens, "
            f"{total / asked_total:.2f}x the {asked_total:,} this config asks for; the learning rate and schedule "
            "were tuned for that. Pass a smaller --batch_size, or --total_batch_tokens to change the step on purpose."
        )
    return line


def resolve(cfg: TrainConfig, world_size: int, given: frozenset[str] = frozenset()) -> TrainConfig:
    """Derive the batch (resolve_batch) and check everything; one ValueError lists all problems."""
    problems = []
    try:
        cfg = resolve_batch(cfg, world_size, given)
    except ValueError as e:
        problems.append(str(e))
    problems += shape_problems(cfg)  # the model's own validation
    positive = (
        "rollback_after",
        "batch_size",
        "grad_accum_steps",
        "max_steps",
        "eval_interval",
        "log_interval",
        "ckpt_interval",
        "keep_ckpts",
        "tune_steps",
        "tune_warmup",
    )
    problems += [f"{name} must be at least 1, got {getattr(cfg, name)}" for name in positive if getattr(cfg, name) < 1]
    if cfg.vocab_size > 65536:
        problems.append(f"vocab_size {cfg.vocab_size} does not fit the uint16 token shards (at most 65536)")
    choices = {
        "dtype": ("auto", "float32", "bfloat16", "float16"),
        "compile": ("auto", "true", "false"),
        "fused_loss": ("auto", "true", "false"),
        "device": ("auto", "cpu", "cuda"),
        "strategy": ("auto", "ddp", "fsdp", "hsdp"),
        "lr_schedule": ("cosine", "constant", "wsd"),
        "optimizer": ("adamw", "muon"),
        "wandb": ("online", "offline", "disabled"),
        "eval_tasks_at": ("eval", "end"),
    }
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            problems.append(f"{name} must be one of {', '.join(valid)}, got {getattr(cfg, name)!r}")
    if not (0 <= cfg.min_lr <= cfg.lr) or not math.isfinite(cfg.lr):
        problems.append(f"need 0 <= min_lr <= lr, got min_lr={cfg.min_lr}, lr={cfg.lr}")
    if not cfg.muon_lr >= 0:
        problems.append(f"muon_lr must be >= 0 (0: twice lr), got {cfg.muon_lr}")
    if cfg.spike_window < MIN_HISTORY:
        problems.append(f"spike_window must be at least {MIN_HISTORY} (the steps the guard judges from), got "
                        f"{cfg.spike_window}")  # fmt: skip
    if not (cfg.spike_zscore >= 0 and cfg.spike_grad_zscore >= 0) or cfg.max_rollbacks < 0:
        problems.append(f"spike_zscore (0: off), spike_grad_zscore (0: not judged) and max_rollbacks must be >= 0, "
                        f"got {cfg.spike_zscore}, {cfg.spike_grad_zscore}, {cfg.max_rollbacks}")  # fmt: skip
    if cfg.gpu_memory_gb < 0:
        problems.append(f"gpu_memory_gb must be >= 0 (0: this GPU's), got {cfg.gpu_memory_gb}")
    if cfg.collective_timeout_s <= 0:
        problems.append(f"collective_timeout_s must be positive, got {cfg.collective_timeout_s}")
    if cfg.warmup_steps < 0 or cfg.decay_steps < 0:
        problems.append("warmup_steps and decay_steps must be >= 0")
    if cfg.eval_tasks_limit < 0:
        problems.append(f"eval_tasks_limit must be >= 0 (0: every document), got {cfg.eval_tasks_limit}")
    if cfg.eval_tokens < cfg.block_size:
        problems.append(f"eval_tokens ({cfg.eval_tokens}) must be at least block_size ({cfg.block_size})")
    try:
        profile_range(cfg.profile_steps)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError(sentence("Invalid training config: ", problems))
    return cfg


def profile_range(spec: str) -> tuple[int, int] | None:
    """--profile_steps "A:B" -> (A, B), the first and last step profiled (as logged); "" -> None."""
    if not spec:
        return None
    first, _, last = spec.partition(":")
    try:
        steps = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"profile_steps takes FIRST:LAST step numbers, e.g. 10:12, got {spec!r}") from None
    if not 1 <= steps[0] <= steps[1]:
        raise ValueError(f"profile_steps needs 1 <= FIRST <= LAST, got {spec!r}")
    return steps


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based, as logged and checkpointed): a pure function of it."""
    done = step - 1  # updates before this one
    if done < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay = cfg.decay_steps or max(1, cfg.max_steps // 5)
        decay_start = cfg.max_steps - decay
        if done < decay_start:
            return cfg.lr
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, (done - decay_start) / decay)
    progress = min(1.0, (done - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
