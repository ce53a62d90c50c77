"""The one place that turns a dtype setting into the run's dtype and its autocast context:
training, evaluation, the benchmark, export and the dry run all ask here."""

from __future__ import annotations

import torch

PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gpu_computes_bfloat16() -> bool:
    """Whether this process's GPU has bfloat16 tensor cores: compute capability 8.0 (Ampere) and newer.
    Not torch.cuda.is_bf16_supported(), which by default also says yes on a V100 or T4 (sm70/75), where
    bfloat16 is only emulated: slow, and Inductor declines to compile it."""
    return torch.cuda.get_device_capability() >= (8, 0)


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
