"""llm.c's model files against the format's definition, not against gpt2repro/llmc.py itself.

The oracle writer below is this test's own, from llm.c's header and parameter order as its
train_gpt2.py write_model and train_gpt2.c fill_in_parameter_sizes define them, with its own
bfloat16 rounding (round to nearest even on the float32 bits). The last test runs llm.c's own C
reader and forward pass where llm.c's source is at hand (LLMC_DIR): it is not vendored.
"""

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2repro import llmc, weights
from gpt2repro.data import EvalWindows
from gpt2repro.distributed import DistInfo
from gpt2repro.evaluate import val_loss
from gpt2repro.model import GPT, GPTConfig
from gpt2repro.parallel import Layout

# A vocabulary that is not a multiple of 128: llm.c pads it to 384 rows.
CONFIG = GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=8)


def random_model(config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # nonzero biases and LayerNorms too, so that every tensor's place is checked
    return model


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even (no NaNs here)."""
    bits = values.astype("<f4").view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def spec_file(model: GPT, dtype: str) -> bytes:
    """The llm.c model file of `model`, written from the format's definition alone."""
    c, sd = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    padded = (c.vocab_size + 127) // 128 * 128
    header = [20240326, 3 if dtype == "float32" else 5, c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd]
    out = struct.pack("<256i", *header, padded, *([0] * 248))
    wte = np.zeros((padded, c.n_embd), dtype=np.float32)
    wte[: c.vocab_size] = sd["transformer.wte.weight"][: c.vocab_size]
    tensors = [wte, sd["transformer.wpe.weight"]]
    # llm.c's order: ln1w ln1b qkvw qkvb attprojw attprojb ln2w ln2b fcw fcb fcprojw fcprojb, each over all layers
    for kind in (
        "ln_1.weight",
        "ln_1.bias",
        "attn.c_attn.weight",
        "attn.c_attn.bias",
        "attn.c_proj.weight",
        "attn.c_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ):
        tensors += [sd[f"transformer.h.{i}.{kind}"] for i in range(c.n_layer)]
    tensors += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    for t in tensors:  # (out, in) as nn.Linear holds them: llm.c's layout
        out += t.astype("<f4").tobytes() if dtype == "float32" else bf16_bits(t).tobytes()
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_written_files_are_byte_identical_to_the_format_and_read_back(dtype, tmp_path):
    model = random_model()
    path = tmp_path / "model.bin"
    llmc.write(model.state_dict(), model.config, path, dtype)
    assert path.read_bytes() == spec_file(model, dtype)
    config, state, stored = llmc.read(path)
    assert stored == dtype and config == CONFIG
    for name, tensor in model.state_dict().items():
        expected = tensor if dtype == "float32" else tensor.to(torch.bfloat16).float()  # torch's own rounding
        assert torch.equal(state[name], expected), name


def test_a_padded_vocabulary_is_written_unpadded_and_repadded_to_llmcs_multiple(tmp_path):
    model = random_model(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=8, pad_vocab_multiple=64))
    path = tmp_path / "model.bin"
    llmc.write(model.state_dict(), model.config, path)  # 320 rows in the model, 384 in the file, 300 real
    assert llmc.read_header(path)[2] == 384
    loaded, _ = weights.load_model(str(path))
    assert loaded.config.vocab_size == 300 and loaded.transformer.wte.weight.shape == (300, 8)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def _corrupt(tmp_path: Path, name: str, change) -> Path:
    good = tmp_path / "good.bin"
    if not good.exists():
        llmc.write(random_model().state_dict(), CONFIG, good)
    data = bytearray(good.read_bytes())
    path = tmp_path / name
    path.write_bytes(change(data))
    return path


def test_bad_files_give_one_line_errors(tmp_path):
    def header_int(i: int, value: int):
        def change(data):
            data[4 * i : 4 * i + 4] = struct.pack("<i", value)
            return data

        return change

    C, L = CONFIG.n_embd, CONFIG.n_layer  # GPT-2's parameter count, with llm.c's 384 vocabulary rows
    size = 1024 + 4 * (384 * C + CONFIG.block_size * C + L * (12 * C * C + 13 * C) + 2 * C)
    cases = {
        "truncated": (
            lambda d: d[:-10],
            f"is {size - 10:,} bytes but its header (2 layers, 8 channels, 384 vocabulary "
            f"rows, float32) needs {size:,}: it is truncated",
        ),
        "trailing": (lambda d: d + b"\0" * 8, "it has trailing bytes"),
        "version": (header_int(1, 4), "llm.c model version 4; this reads versions 3 (float32) and 5"),
        "heads": (header_int(5, 3), "n_embd (8) must be divisible by n_head (3)"),
        "padded": (header_int(7, 100), "padded_vocab_size 100 is smaller than vocab_size 300"),
        "short": (lambda d: d[:100], "shorter than llm.c's 1024-byte model header"),
    }
    for name, (change, fragment) in cases.items():
        with pytest.raises(llmc.LlmcError) as error:
            llmc.read(_corrupt(tmp_path, name, change))
        assert fragment in str(error.value) and "\n" not in str(error.value), (name, str(error.value))
    wrong_magic = _corrupt(tmp_path, "magic", header_int(0, 20240520))  # a token shard's magic, not a model's
    assert weights.kind_of(str(wrong_magic)) == "export"  # not taken for an llm.c model
    with pytest.raises(ValueError, match="neither a model file written by launch/export.py nor an llm.c model"):
        weights.open_weights(str(wrong_magic))
    with pytest.raises(llmc.LlmcError, match="magic 20240520, expected 20240326"):
        llmc.read(wrong_magic)
    with pytest.raises(llmc.LlmcError, match="bias=False"):
        llmc.write({}, GPTConfig(bias=False), tmp_path / "x.bin")


LLMC_DIR = os.environ.get("LLMC_DIR")
# llm.c's own reader and forward pass (train_gpt2.c with its main renamed away): the val loss of a model file
# over the first N batches of B x T tokens of a token shard, as train_gpt2.c's main computes its val loss.
DRIVER = r"""
#define main llmc_train_main
#include "train_gpt2.c"
#undef main
int main(int argc, char **argv) {
    GPT2 model;
    gpt2_build_from_checkpoint(&model, argv[1]);
    int B = atoi(argv[3]), T = atoi(argv[4]), n = atoi(argv[5]);
    DataLoader val;
    dataloader_init(&val, argv[2], B, T, 0, 1, 0);
    float loss = 0.0f;
    for (int i = 0; i < n; i++) {
        dataloader_next_batch(&val);
        gpt2_forward(&model, val.inputs, val.targets, B, T);
        loss += model.mean_loss;
    }
    printf("val loss %.7f\n", loss / n);
    return 0;
}
"""


@pytest.mark.skipif(
    not (LLMC_DIR and (Path(LLMC_DIR) / "train_gpt2.c").is_file()),
    reason="set LLMC_DIR to a checkout of github.com/karpathy/llm.c (its train_gpt2.c and llmc/) to run its C code",
)
def test_llmcs_own_c_code_loads_an_export_and_computes_our_val_loss(shakespeare_data, tmp_path):
    driver = tmp_path / "val_loss.c"
    driver.write_text(DRIVER)
    binary = tmp_path / "val_loss"
    subprocess.run(
        ["gcc", "-O2", f"-I{LLMC_DIR}", "-o", str(binary), str(driver), "-lm"], check=True, capture_output=True
    )
    model = random_model(GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.05)  # a loss near a trained model's, not a saturated one
    path = tmp_path / "model.bin"
    llmc.write(model.state_dict(), model.config, path)
    batches, B, T = 4, 4, 32
    val = next(shakespeare_data.glob("*val*.bin"))
    out = subprocess.run(
        [str(binary), str(path), str(val), str(B), str(T), str(batches)], check=True, capture_output=True, text=True
    ).stdout
    theirs = float(out.strip().splitlines()[-1].removeprefix("val loss "))
    ours_model, _ = weights.load_model(str(path))
    windows = EvalWindows(str(shakespeare_data), "val", T, batches * B * T, 50257)
    ours = val_loss(ours_model, windows, B, Layout(DistInfo()), torch.autocast("cpu", enabled=False))
    assert ours == pytest.approx(theirs, rel=1e-6), (ours, theirs)
