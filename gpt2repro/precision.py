"""The one place that turns a dtype setting into the run's dtype and its autocast context:
training, evaluation, the benchmark, export and the dry run all ask here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2repro.devices import fused_loss_pays, gpu_computes_bfloat16
from gpt2repro.schema import SWITCH, Settings, setting

PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PrecisionSettings(Settings):
    TITLE = "precision and compile"

    dtype: str = setting(
        "auto",
        "auto: bfloat16 on a GPU that computes it, else float16 with loss scaling; float32 on a CPU",
        auto=True,
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    compile: str = setting(
        "auto", "torch.compile the model (auto: on a GPU)", auto=True, resumable=True, choices=SWITCH
    )
    fused_loss: str = setting(
        "auto",
        "the loss without the full logits (gpt2repro/loss.py; auto: on a CPU)",
        auto=True,
        resumable=True,
        choices=SWITCH,
    )
    fp8: bool = setting(
        False, "the blocks' matmuls in float8 (torchao; GPUs of compute capability 8.9+)", resumable=True
    )

    def settled(self, machine) -> dict:
        return {
            "dtype": resolve_dtype(self.dtype, machine.device_type, gpu_bfloat16=machine.gpu_bfloat16),
            "compile": _switch(self.compile, machine.device_type == "cuda"),
            "fused_loss": _switch(self.fused_loss, fused_loss_pays(machine.device_type)),
        }


def _switch(setting: str, auto: bool) -> str:
    return setting if setting != "auto" else ("true" if auto else "false")


def resolve_dtype(setting: str, device_type: str, trained_in: str = "auto", gpu_bfloat16: bool | None = None) -> str:
    """The dtype a run computes in: the setting when given, else the one its checkpoint trained in
    (eval, export), else bfloat16 on a GPU (float16 with the GradScaler where the GPU lacks bfloat16
    tensor cores: gpu_bfloat16, by default this process's GPU) and float32 on a CPU. A GPU that is
    planned for but not present (a dry run on a laptop) is taken to have bfloat16."""
    name = setting if setting != "auto" else trained_in
    if name != "auto":
        return name
    if device_type == "cuda":
        if gpu_bfloat16 is None:
            gpu_bfloat16 = not torch.cuda.is_available() or gpu_computes_bfloat16()
        return "bfloat16" if gpu_bfloat16 else "float16"
    return "float32"


def autocast(dtype: str, device_type: str) -> torch.autocast:
    """Matmuls in dtype, reductions and softmax in float32; a no-op for float32."""
    return torch.autocast(device_type, dtype=PTDTYPE[dtype], enabled=dtype != "float32")


def precision(setting: str, device_type: str, trained_in: str = "auto") -> tuple[str, torch.autocast]:
    """(the run's dtype, its autocast context). On CUDA, float32 matmuls and convolutions use TF32."""
    dtype = resolve_dtype(setting, device_type, trained_in)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dtype, autocast(dtype, device_type)
