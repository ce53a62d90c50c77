"""The seed article's minGPT API and the two worked examples (reduced)."""

import importlib.util
import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingDataset(Dataset):
    """Rows that count upwards modulo vocab_size from a random start: learnt in a few steps."""

    def __init__(self, n: int, vocab_size: int, block_size: int):
        start = torch.randint(0, vocab_size, (n, 1), generator=torch.Generator().manual_seed(n))
        self.data = (start + torch.arange(block_size + 1)) % vocab_size

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


def test_seed_article_snippet_runs_as_written():
    torch.manual_seed(0)  # weights, data order and the prompt: the same run every time
    vocab_size, block_size = 11, 8
    train_dataset, test_dataset = (
        CountingDataset(16, vocab_size, block_size),
        CountingDataset(8, vocab_size, block_size),
    )
    x = torch.randint(0, vocab_size, (1, 4))

    # --- the article's code, module name aside ---
    from gpt2repro.model import GPT, GPTConfig

    mconf = GPTConfig(vocab_size, block_size, n_layer=12, n_head=12, n_embd=768)
    model = GPT(mconf)
    from gpt2repro.trainer import Trainer, TrainerConfig

    trainer = Trainer(model, train_dataset, test_dataset, TrainerConfig(max_epochs=10, batch_size=256))
    trainer.train()
    from gpt2repro.utils import sample

    y = sample(model, x, steps=30, temperature=1.0, sample=True, top_k=5)[0]
    # --- end ---

    assert y.shape == (34,) and torch.equal(y[:4], x[0])
    assert trainer.iter_num == 10 and len(trainer.test_losses) == 10
    assert trainer.test_losses[-1] < 0.5 * trainer.test_losses[0]


def test_trainer_lr_decay_and_checkpoint(tmp_path):
    from gpt2repro.model import GPT, GPTConfig
    from gpt2repro.trainer import Trainer, TrainerConfig

    torch.manual_seed(0)
    data = CountingDataset(64, 7, 8)
    model = GPT(GPTConfig(7, 8, n_layer=1, n_head=1, n_embd=16))
    cfg = TrainerConfig(
        max_epochs=4,
        batch_size=16,
        lr_decay=True,
        warmup_tokens=128,
        final_tokens=1024,
        ckpt_path=str(tmp_path / "m.pt"),
    )
    trainer = Trainer(model, data, data, cfg)
    assert trainer._lr() == 0.0  # warmup starts from zero
    trainer.train()
    assert trainer.tokens == 4 * 64 * 8
    assert math.isclose(trainer._lr(), 0.1 * cfg.learning_rate)  # past final_tokens: the 10% floor
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(state) == set(model.state_dict())


def test_adder_example_generalises_to_held_out_sums():
    adder = load_example("adder")
    # Reduced run (the full default reaches 100%); a guess would be right about 1 time in 1000.
    test_accuracy = adder.main(["--ndigit", "2", "--max-iters", "500", "--lr", "2e-3"])
    assert test_accuracy >= 0.5


def test_chargpt_example_beats_uniform(shakespeare_path):
    chargpt = load_example("chargpt")
    args = ["--text", str(shakespeare_path), "--max-iters", "60", "--batch-size", "16", "--block-size", "32"]
    args += ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--val-batches", "10"]
    val_loss = chargpt.main(args)
    assert val_loss < math.log(65) - 1.0  # 65 distinct characters; uniform would be log(65) = 4.17
