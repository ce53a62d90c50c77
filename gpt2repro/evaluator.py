"""Evaluation during training, and when (EvalSettings, gpt2repro/evaluate.py): the val loss every eval_interval
steps and at the last, HellaSwag beside it, and lm-eval's tasks (gpt2repro/harness.py, an extra) at every
evaluation or at the last step only. A new in-loop evaluation is a setting in EvalSettings and a line here."""

from __future__ import annotations

import random

import numpy as np
import torch

from gpt2repro import distributed as D
from gpt2repro import evaluate
from gpt2repro.data import EvalWindows
from gpt2repro.schedule import periodic


class Evaluator:
    """Evaluation during training, and when: every eval_interval steps and at the last step. The val
    loss over the fixed windows, HellaSwag's acc_norm when a HellaSwag file is given, and lm-eval's
    eval_tasks (as "TASK/METRIC") at every evaluation or at the last step only (eval_tasks_at)."""

    def __init__(self, cfg, windows: EvalWindows, hellaswag_examples: list | None, model, raw_model, layout, autocast):
        self.cfg, self.windows, self.hellaswag_examples = cfg, windows, hellaswag_examples
        self.model, self.raw_model, self.layout, self.autocast = model, raw_model, layout, autocast
        self.tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]
        if self.tasks:
            from gpt2repro import harness  # lm-eval is an extra: the run fails at start-up without it

            self.task_data = harness.parse_task_data(cfg.eval_task_data)

    def due(self, step: int) -> bool:
        return periodic(step, self.cfg.eval_interval, self.cfg.max_steps)

    def __call__(self, step: int) -> dict:
        results = {
            "val_loss": evaluate.val_loss(self.model, self.windows, self.cfg.batch_size, self.layout, self.autocast)
        }
        if self.hellaswag_examples:
            scores = evaluate.hellaswag(self.raw_model, self.hellaswag_examples, self.layout, self.autocast)
            results["hellaswag_acc_norm"] = scores["acc_norm"]
        if self.tasks and (self.cfg.eval_tasks_at == "eval" or step == self.cfg.max_steps):
            results.update(self.lm_eval_tasks())
        return results

    def lm_eval_tasks(self) -> dict:
        """lm-eval's scores on the replicated model, every rank a share of the documents; the training's
        random state is left as it was, so that a run with tasks trains exactly as one without."""
        from gpt2repro import harness  # the extra, imported where it is used

        was_training, states = self.raw_model.training, (random.getstate(), np.random.get_state())
        devices = [torch.device(self.layout.info.device)] if self.layout.info.device_type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            info = self.layout.info
            lm = harness.GPT2ReproLM(
                model=self.raw_model, batch_size=self.cfg.batch_size, device=info.device, dtype=self.cfg.dtype
            )
            results = harness.run_tasks(
                lm, self.tasks, self.task_data, self.cfg.eval_tasks_limit or None, bootstrap_iters=100
            )
        random.setstate(states[0])
        np.random.set_state(states[1])
        self.raw_model.train(was_training)
        scores = harness.scores(results) if results is not None else {}  # rank 0 has them
        scores = D.broadcast_object(scores, self.layout.info)  # every rank logs the same record
        return {f"{task}/{metric}": value for task, values in scores.items() for metric, value in values.items()}
