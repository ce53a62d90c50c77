"""FP8 training of the transformer blocks' Linear layers: torchao's float8 recipe.

Each block's four matmuls (c_attn, attn.c_proj, c_fc, mlp.c_proj) run in float8 with
dynamic per-tensor scales (e4m3 forward, e5m2 for the output gradient), on the FP8 tensor
cores of Ada, Hopper and Blackwell GPUs; the master weights, optimizer and every other
op stay as they are. The embeddings and the tied lm_head (the fused loss's matmuls) stay
in the autocast dtype, as in torchao's and torchtitan's recipes. Parameter names do not
change, so checkpoints move freely between fp8 and bf16 runs.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt2repro.devices import gpu_computes_float8

INSTALL = "pip install torchao"


def check_supported(device: str) -> None:
    """Raise ValueError naming the problem when this device or install cannot train in FP8."""
    dev = torch.device(device)
    if not gpu_computes_float8(dev):
        what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "a CPU"
        raise ValueError(
            f"--fp8 true needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
            f"Blackwell), and this is {what}; drop --fp8 (bf16 is the default)."
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ValueError(f"--fp8 true trains with torchao's float8 recipe; install it: {INSTALL}") from None


def convert(model: nn.Module) -> None:
    """Swap the blocks' nn.Linear layers for torchao's Float8Linear, in place (before FSDP and compile)."""
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=_in_blocks)


def _in_blocks(module: nn.Module, fqn: str) -> bool:
    # FP8 matmuls need both dimensions divisible by 16 (all GPT-2 sizes are).
    return fqn.startswith("transformer.h.") and module.in_features % 16 == 0 and module.out_features % 16 == 0
