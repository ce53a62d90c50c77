"""GPT-2's evaluation table for any model, through EleutherAI's lm-evaluation-harness (lm-eval).

    python launch/eval.py --ckpt runs/124m --tasks lambada_openai,hellaswag,wikitext --vs gpt2-124m
    python -m gpt2repro.harness --model gpt2repro --model_args ckpt=runs/124m --tasks lambada_openai
    torchrun --nproc_per_node=8 -m gpt2repro.harness --model gpt2repro --model_args ckpt=runs/124m ...

`GPT2ReproLM` is registered with lm-eval as the model "gpt2repro". It takes anything weights.load_model
takes (a run, a checkpoint, an exported .pt, an llm.c file, a Hugging Face directory, a GPT-2 name) and
scores requests as lm-eval's own HFLM scores a transformers model, convention for convention, so that the
same weights give the same numbers:
    - a context's trailing spaces move to its continuation; context and continuation are encoded together
      and split (TemplateLM, inherited);
    - an input longer than block_size + 1 tokens loses tokens from the left;
    - a rolling (perplexity) document is scored in disjoint block_size windows, the first one after
      <|endoftext|>;
    - generation is greedy, from the context's last block_size - max_gen_toks tokens, cut at the first stop
      sequence.
lm-eval 0.4 has no plugin discovery, so the stock `lm_eval` command does not know "gpt2repro";
`python -m gpt2repro.harness` is that command with it registered, and `import gpt2repro.harness` does the
same for lm_eval.simple_evaluate.

Under torchrun, lm-eval gives each rank a share of the documents and gathers the results on rank 0; every
rank holds the whole model (weights.load_model), so ranks need not run the same forwards.

Tasks by name are lm-eval's, plus `lambada_openai_last_token` (gpt2repro/lm_tasks/), the GPT-2 paper's
LAMBADA scoring. A task's data is the Hub's unless `task_data` names a local file for it: the task then
runs from a copy of its YAML that reads that json/jsonl/parquet file instead (`local_task`), and nothing
is downloaded.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

try:
    import lm_eval
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry imports them only when empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # one line from every entry point (errors.first_line)
    raise ImportError(f"lm-evaluation-harness is not installed ({e}); pip install 'gpt2repro[eval]'.") from None

import torch
import torch.distributed as dist
from torch.nn import functional as F

from gpt2repro import distributed as D
from gpt2repro import weights
from gpt2repro.precision import precision
from gpt2repro.tokenizer import EOT, EOT_ID, gpt2

OUR_TASKS = Path(__file__).with_name("lm_tasks")  # tasks of our own: the paper's LAMBADA scoring
DATA_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")


@register_model("gpt2repro")
class GPT2ReproLM(TemplateLM):
    """A gpt2repro GPT as an lm-eval model: `ckpt` is any source weights.load_model opens, or `model` a GPT
    already built (training's evaluation); it scores under `dtype`'s autocast (auto: the dtype it trained in,
    a checkpoint's own or `trained_in`)."""

    def __init__(
        self,
        ckpt: str | None = None,
        model=None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str = "auto",
        trained_in: str = "auto",
        max_gen_toks: int = 256,
        **_ignored,  # lm-eval's CLI passes max_batch_size and the like to every model
    ) -> None:
        super().__init__()
        if (ckpt is None) == (model is None):
            raise ValueError("pass the model to evaluate: --model_args ckpt=RUN_OR_CHECKPOINT_OR_FILE.")
        if model is None:
            model, about = weights.load_model(str(ckpt))
            trained_in = about.dtype
        self.info = D.init("auto" if device in (None, "auto") else str(device).split(":")[0])
        self._device = torch.device(self.info.device)
        self.model = model.to(self._device).eval()
        self._dtype, self.autocast = precision(dtype, self._device.type, trained_in)
        self._rank, self._world_size = self.info.rank, self.info.world_size
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": a fixed batch here
        self.max_length = self.model.config.block_size
        self.max_gen_toks = int(max_gen_toks)
        self.enc = gpt2()

    # ----- tokens ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return EOT_ID

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.enc.encode(string, allowed_special={EOT})

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    # ----- scoring -----------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation, whether greedy decoding gives exactly it) per request;
        longest first in batches of batch_size, right-padded (a causal model never sees the padding)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in chunk]
            tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
            for r, row in enumerate(rows):
                tokens[r, : len(row)] = torch.tensor(row)
            with self.autocast:
                logits, _ = self.model(tokens.to(self._device))
            for r, i in enumerate(chunk):
                continuation = requests[i][2]
                n = len(continuation)
                logprobs = F.log_softmax(logits[r, len(rows[r]) - n : len(rows[r])].float(), dim=-1)
                target = torch.tensor(continuation, device=self._device)
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = (logprobs.gather(1, target[:, None]).sum().item(), greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood over disjoint block_size windows (lm-eval's own windows)."""
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, one request at a time with the KV cache, each cut at its first stop sequence."""
        out = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise ValueError("gpt2repro's lm-eval model generates greedily; drop do_sample/temperature.")
            until = handle_stop_sequences(kwargs.get("until"), eos=EOT)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            if budget >= self.max_length:
                raise ValueError(f"max_gen_toks {budget} leaves no context in block_size {self.max_length}.")
            tokens = self.tok_encode(context)[-(self.max_length - budget) :]
            out.append(postprocess_generated_text(self._greedy(tokens, budget, until), until, None))
        return out

    def _greedy(self, tokens: list[int], budget: int, until: list[str]) -> str:
        cache: list = []
        new: list[int] = []
        x = torch.tensor([tokens], device=self._device)
        for _ in range(budget):
            with self.autocast:
                logits, _ = self.model(x, kv_cache=cache)
            new.append(int(logits[0, -1].argmax()))
            text = self.enc.decode(new)
            if any(stop in text for stop in until):
                break
            x = torch.tensor([[new[-1]]], device=self._device)
        return self.enc.decode(new)

    # ----- lm-eval's share of the documents across ranks -----------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        tensor = tensor.reshape(1, *tensor.shape) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        gathered = D.gather_objects(obj, self.info)  # every rank takes part
        return gathered if self.rank == dst else None

    def barrier(self) -> None:
        D.barrier(self.info)

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.model.num_params(), "model_dtype": self._dtype}


# ----- tasks ---------------------------------------------------------------------------------
def parse_task_data(spec: str | dict | None) -> dict[str, str]:
    """ "lambada_openai=lambada.jsonl,hellaswag=hs.parquet" -> {task: file}; each file must exist."""
    if isinstance(spec, dict):
        pairs = spec
    else:
        pairs = {}
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            task, sep, path = item.partition("=")
            if not sep or not task or not path:
                raise ValueError(f"task data {item!r} is not TASK=FILE (e.g. lambada_openai=lambada_test.jsonl).")
            pairs[task.strip()] = path.strip()
    for task, path in pairs.items():
        if not Path(path).is_file():
            raise ValueError(f"the data file {path} given for task {task} does not exist.")
        if Path(path).suffix not in DATA_FORMATS:
            raise ValueError(f"{path}: task data must be {', '.join(DATA_FORMATS)}; convert it (task {task}).")
    return pairs


def find_task_yaml(task: str) -> Path:
    """The YAML that defines `task`, ours or lm-eval's: a text search, not lm-eval's whole index."""
    named = re.compile(rf"^task:\s*[\"']?{re.escape(task)}[\"']?\s*$", re.M)
    for root in (OUR_TASKS, Path(lm_eval.__file__).parent / "tasks"):
        for path in sorted(root.rglob("*.yaml")):
            if named.search(path.read_text(errors="ignore")):
                return path
    raise ValueError(f"no lm-eval task is named {task!r}; `lm_eval ls tasks` lists them.")


def local_task(task: str, data_file: str, out_dir: Path) -> Path:
    """A task YAML in out_dir that is `task` (its own YAML, included), reading its evaluation split from
    data_file; the other splits are dropped, so a zero-shot task needs nothing else."""
    import yaml

    base = find_task_yaml(task)
    config = _merged_yaml(base)
    split_key = next((k for k in SPLIT_KEYS[:2] if config.get(k)), None)
    if split_key is None:
        raise ValueError(f"task {task} evaluates no test or validation split; it cannot run from a local file.")
    split = config[split_key]
    override = {
        "include": str(base),
        "task": task,
        "dataset_path": DATA_FORMATS[Path(data_file).suffix],
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(Path(data_file).resolve())}},
        **{key: None for key in SPLIT_KEYS if key != split_key},
        split_key: split,
        "num_fewshot": 0,
    }
    path = out_dir / f"{task}.yaml"
    path.write_text(yaml.safe_dump(override, sort_keys=False))
    return path


def _merged_yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False, recursive=True)


def task_manager(tasks: list[str], task_data: dict[str, str], task_dirs: list[str], out_dir: Path) -> TaskManager:
    """lm-eval's TaskManager for `tasks`: lm-eval's, ours, the user's task_dirs, and local copies of those
    with data files (last, so they win). Indexing lm-eval's thousands of task files costs seconds, so it is
    skipped when no task needs it."""
    for task, data_file in task_data.items():
        local_task(task, data_file, out_dir)
    elsewhere = {path.stem for d in (OUR_TASKS, *map(Path, task_dirs)) for path in Path(d).rglob("*.yaml")}
    needs_lm_eval = any(task not in task_data and task not in elsewhere for task in tasks)
    paths = [str(OUR_TASKS), *task_dirs, str(out_dir)]
    return TaskManager(include_path=paths, include_defaults=needs_lm_eval)


def run_tasks(
    lm: GPT2ReproLM,
    tasks: list[str],
    task_data: dict[str, str] | None = None,
    limit: int | None = None,
    log_samples: bool = False,
    task_dirs: list[str] = (),
    bootstrap_iters: int = 1000,
) -> dict | None:
    """lm-eval's simple_evaluate on `tasks`, zero-shot: its whole result dict on rank 0, None elsewhere.
    task_data: {task: local data file}; task_dirs: directories of the user's own task YAMLs."""
    task_data = task_data or {}
    for d in task_dirs:
        if not Path(d).is_dir():
            raise ValueError(f"the task directory {d} does not exist.")
    unknown = set(task_data) - set(tasks)
    if unknown:
        raise ValueError(f"data given for {', '.join(sorted(unknown))}, which are not among the tasks {tasks}.")
    # lm-eval bootstraps perplexity's stderr in a forked multiprocessing pool unless DISABLE_MULTIPROC is
    # set; a fork of this process, with its watchdog and process-group threads, can deadlock in the child.
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with tempfile.TemporaryDirectory(prefix="gpt2repro-tasks-") as tmp:
            manager = task_manager(tasks, task_data, list(task_dirs), Path(tmp))
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                log_samples=log_samples,
                bootstrap_iters=bootstrap_iters,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )
    finally:
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC")
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc


def scores(results: dict, stderr: bool = False) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's result, filter names dropped; with stderr, the
    metrics' standard errors instead (where lm-eval computed one)."""
    table = {}
    for task, row in results["results"].items():
        table[task] = {}
        for key, value in row.items():
            name = key.split(",")[0]
            if "," not in key or not isinstance(value, (int, float)) or name.endswith("_stderr") != stderr:
                continue
            table[task][name.removesuffix("_stderr")] = float(value)
    return table


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with "gpt2repro" registered and, under torchrun, the process group joined."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    with D.distributed_context(os.environ.get("GPT2REPRO_DEVICE", "auto")):
        cli_evaluate()


if __name__ == "__main__":
    main()
