"""gpt2repro as an lm-eval model, against lm-eval's own HFLM on the same weights (the oracle).

The small GPT of tests/harness_data.py is evaluated twice on its local tasks: as a transformers GPT-2
through HFLM, and as gpt2repro's GPT through GPT2ReproLM.
"""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # HFLM's

from gpt2repro import evaluate, harness  # noqa: E402
from gpt2repro.distributed import DistInfo  # noqa: E402
from gpt2repro.parallel import layout  # noqa: E402
from gpt2repro.tokenizer import gpt2  # noqa: E402
from tests import harness_data  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return harness_data.build(tmp_path_factory.mktemp("harness"))


TASKS = ["lambada_openai", "wikitext", "hellaswag", "next_line"]


def run(lm, task_data, task_dir, tasks=TASKS):
    return harness.run_tasks(lm, tasks, task_data, task_dirs=[str(task_dir)], log_samples=True)


@pytest.fixture(scope="module")
def both(setup):
    hf_dir, model, task_data, task_dir = setup
    from lm_eval.models.huggingface import HFLM

    oracle = HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), device="cpu", batch_size=4, dtype="float32")
    ours = harness.GPT2ReproLM(model=model, batch_size=3, device="cpu", dtype="float32")
    return run(oracle, task_data, task_dir), run(ours, task_data, task_dir)


def responses(result: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def requests(responses: list) -> list[tuple]:
    flat = [r for doc in responses for r in (doc if isinstance(doc, list) else [doc])]
    return [tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in flat]


@pytest.mark.parametrize("task", TASKS)
def test_every_request_and_metric_matches_hflm_on_the_same_weights(both, task):
    expected, got = both
    theirs, ours = responses(expected, task), responses(got, task)
    assert len(ours) == len(theirs) > 0
    if task == "next_line":
        assert ours == theirs  # the generated strings themselves
    else:  # each request's (log-likelihood, is greedy), or a document's log-likelihood (rolling)
        for a, b in zip(requests(theirs), requests(ours), strict=True):
            assert b[0] == pytest.approx(a[0], rel=1e-4, abs=1e-4)
            assert b[1:] == a[1:]
    want, have = harness.scores(expected)[task], harness.scores(got)[task]
    assert want.keys() == have.keys()
    for metric, value in want.items():
        assert have[metric] == pytest.approx(value, rel=1e-5), metric
    accuracy = {"lambada_openai": "acc", "hellaswag": "acc_norm", "next_line": "exact_match"}.get(task)
    if accuracy:  # the model learned these: agreement is not agreement on 0
        assert have[accuracy] >= 0.2, have
    else:
        assert math.isfinite(have["word_perplexity"]) and have["word_perplexity"] < 200


def test_lambada_last_token_scores_the_last_bpe_token(setup):
    """The paper's LAMBADA scoring against a direct count on the transformers model: the share of texts
    whose last BPE token is the argmax given all earlier tokens."""
    hf_dir, model, task_data, _ = setup
    ours = harness.GPT2ReproLM(model=model, batch_size=4, device="cpu", dtype="float32")
    result = harness.run_tasks(
        ours, ["lambada_openai_last_token"], {"lambada_openai_last_token": task_data["lambada_openai"]}
    )
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    enc, hits = gpt2(), 0
    texts = [json.loads(line)["text"] for line in open(task_data["lambada_openai"])]
    for text in texts:
        tokens = enc.encode_ordinary(text)
        with torch.no_grad():
            logits = hf(torch.tensor([tokens[:-1]])).logits
        hits += int(logits[0, -1].argmax()) == tokens[-1]
    acc = harness.scores(result)["lambada_openai_last_token"]["acc"]
    assert acc == pytest.approx(hits / len(texts))
    assert acc > 0.3


def test_hand_written_hellaswag_is_the_harness_acc_and_differs_only_in_normalisation(setup, both):
    """Our in-loop HellaSwag (llm.c's completion style) on the harness's own prompts: the same summed
    log-likelihood for every ending that both tokenize alike, hence the same acc. Two differences, by
    design: llm.c encodes context and ending apart where the harness encodes them together and splits
    (a merge across the boundary makes other tokens), and acc_norm divides by the ending's tokens (llm.c)
    where the harness divides by its characters."""
    _, model, _, _ = setup
    _, got = both
    samples = sorted(got["samples"]["hellaswag"], key=lambda s: s["doc_id"])
    examples = [
        evaluate.HellaSwagExample(s["doc"]["query"], tuple(s["doc"]["choices"]), s["doc"]["gold"]) for s in samples
    ]
    enc, alike = gpt2(), 0
    for example, sample in zip(examples, samples, strict=True):
        summed, _ = evaluate.hellaswag_losses(model, enc, example, "cpu")
        for ending, ours, (theirs, _) in zip(example.endings, summed, sample["filtered_resps"], strict=True):
            apart = enc.encode_ordinary(example.context) + enc.encode_ordinary(" " + ending)
            if apart == enc.encode_ordinary(example.context + " " + ending):
                # to float32 rounding: llm.c's four endings run as one padded batch (sums here are 2 to 100)
                assert -ours == pytest.approx(theirs, rel=1e-4, abs=1e-2)
                alike += 1
    assert alike >= 0.9 * 4 * len(examples)
    ours = evaluate.hellaswag(model, examples, layout("ddp", DistInfo()), torch.autocast("cpu", enabled=False))
    assert ours["acc"] == pytest.approx(harness.scores(got)["hellaswag"]["acc"])


def test_no_lm_eval_is_one_line_naming_the_extra(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    code = "import sys; sys.modules['lm_eval'] = None; sys.argv[1:] = ['--hf', 'x', '--tasks', 'hellaswag']; "
    code += "sys.path.insert(0, 'launch'); import eval as e; sys.exit(e.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'gpt2repro[eval]'" in lines[0], done.stderr
