"""Small lm-eval tasks on local files, and a small GPT that has learned them: for the harness tests.

A GPT trained for a few seconds on the very documents it is then asked about, so that accuracies are far
from 0 and agreement on them means something; saved in transformers' format too, with GPT-2's own
tokenizer files, for lm-eval's HFLM. Four request types: loglikelihood (lambada_openai),
loglikelihood_rolling (wikitext), multiple choice (hellaswag) and generate_until (next_line, a task of
the tests' own). Nothing downloads.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from gpt2repro.model import GPT, GPTConfig
from gpt2repro.tokenizer import gpt2
from tests.conftest import SHAKESPEARE, SHARED

STEPS = 180  # enough for accuracies between 0.2 and 1, not all 1
OPENAI_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GENERATION_TASK = """\
task: next_line
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def openai_tokenizer_files(out_dir):
    """GPT-2's own encoder.json and vocab.bpe (tiktoken's cache of OpenAI's files, in ../shared) as a
    Hugging Face tokenizer directory: an independent tokenizer for the oracle."""
    cache = SHARED / "tiktoken_cache"
    for name, target in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        source = cache / hashlib.sha1((OPENAI_FILES + name).encode()).hexdigest()
        if not source.is_file():
            pytest.skip("GPT-2's tokenizer files (../shared/tiktoken_cache) are not here")
        shutil.copy(source, out_dir / target)


def passages(n_words: int, count: int, offset: int = 0) -> list[str]:
    words = SHAKESPEARE.read_text().split()
    return [" ".join(words[offset + i * n_words : offset + (i + 1) * n_words]) for i in range(count)]


def build(root: Path):
    """(HF directory, our GPT, local task data by task name, a directory with the generation task)."""
    lambada = passages(20, 16)
    pages = passages(120, 2, offset=2000)
    story = passages(20, 12, offset=4000)
    prompts = passages(15, 12, offset=6000)
    hellaswag = [
        {
            "ind": i,
            "activity_label": "Verse",
            "ctx_a": " ".join(text.split()[:10]),
            "ctx_b": " ".join(text.split()[10:12]),
            "ctx": " ".join(text.split()[:12]),
            "endings": [" ".join(story[(i + k) % len(story)].split()[12:]) for k in range(4)],
            "label": str(0),
            "source_id": "x",
            "split": "val",
            "split_type": "indomain",
        }
        for i, text in enumerate(story)
    ]
    for i, row in enumerate(hellaswag):  # the right ending in a different place each time
        k = i % 4
        row["endings"][0], row["endings"][k] = row["endings"][k], row["endings"][0]
        row["label"] = str(k)
    # The answer opens a line: the prompt's last token is its newline, as in training.
    generation = [{"prompt": " ".join(t.split()[:12]) + "\n", "answer": " ".join(t.split()[12:])} for t in prompts]

    files = {
        "lambada_openai": ("lambada.jsonl", [{"text": t} for t in lambada]),
        "wikitext": ("wikitext.jsonl", [{"page": p} for p in pages]),
        "hellaswag": ("hellaswag.jsonl", hellaswag),
        "generation": ("generation.jsonl", generation),
    }
    task_data = {}
    for task, (name, rows) in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        task_data[task] = str(root / name)
    task_dir = root / "tasks"
    task_dir.mkdir()
    (task_dir / "next_line.yaml").write_text(GENERATION_TASK.format(data=task_data.pop("generation")))

    # Overfit a small GPT on those texts, then save it in transformers' format. The softmax runs over
    # the few hundred tokens these texts use, not all 50,257: seconds, not minutes, of training.
    enc = gpt2()
    text = "\n".join(lambada + pages + story + [g["prompt"] + g["answer"] for g in generation])
    tokens = torch.tensor(enc.encode_ordinary(text))
    used, targets = torch.unique(tokens, return_inverse=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    t = model.transformer
    for _ in range(STEPS):
        starts = torch.randint(0, len(tokens) - 65, (16,))
        x = torch.stack([tokens[s : s + 64] for s in starts])
        y = torch.stack([targets[s + 1 : s + 65] for s in starts])
        h = t.wte(x) + t.wpe(torch.arange(64))
        for block in t.h:
            h = block(h)
        logits = t.ln_f(h) @ t.wte.weight[used].T
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    openai_tokenizer_files(hf_dir)
    return hf_dir, model, task_data, task_dir
