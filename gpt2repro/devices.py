"""Facts about the machine, in one place: what a GPU computes in (bfloat16, float8), its dense peak FLOP/s,
its memory, and where the fused loss pays. settle (gpt2repro/settings.py) asks here for every auto it decides,
through a Machine: this process's, or GPUs planned for elsewhere (the dry run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 2**30


@dataclass(frozen=True)
class Machine:
    """What the settings depend on. Built for this process (`this`), or for GPUs planned for elsewhere
    (`planned`, the dry run)."""

    device_type: str  # cpu | cuda
    world_size: int = 1
    ranks_per_node: int = 0  # 0: all on one node
    gpu_memory_bytes: float = 0.0  # per GPU; 0: none (a CPU)
    gpu_name: str = ""  # for the peak FLOP/s table
    gpu_bfloat16: bool = True  # bfloat16 tensor cores (compute capability 8.0+); a planned GPU is taken to have them

    @classmethod
    def this(cls, device: str, world_size: int, ranks_per_node: int) -> Machine:
        """This process's device (as distributed.init picked it) and launch."""
        if torch.device(device).type != "cuda":
            return cls("cpu", world_size, ranks_per_node)
        props = torch.cuda.get_device_properties(device)
        return cls("cuda", world_size, ranks_per_node, float(props.total_memory), props.name, gpu_computes_bfloat16())

    @classmethod
    def planned(cls, world_size: int, ranks_per_node: int, gpu_memory_gb: float, here: Machine) -> Machine:
        """world_size GPUs of gpu_memory_gb (0: this machine's) in nodes of ranks_per_node: planned from here."""
        gpu_bytes = gpu_memory_gb * GiB or here.gpu_memory_bytes
        if not gpu_bytes:
            return cls("cpu", world_size, ranks_per_node)
        return cls("cuda", world_size, ranks_per_node, gpu_bytes, here.gpu_name, here.gpu_bfloat16)


def gpu_computes_bfloat16() -> bool:
    """Whether this process's GPU has bfloat16 tensor cores: compute capability 8.0 (Ampere) and newer.
    Not torch.cuda.is_bf16_supported(), which by default also says yes on a V100 or T4 (sm70/75), where
    bfloat16 is only emulated: slow, and Inductor declines to compile it."""
    return torch.cuda.get_device_capability() >= (8, 0)


def gpu_computes_float8(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) and newer: Ada, Hopper, Blackwell."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fused_loss_pays(device_type: str) -> bool:
    """Where the fused loss is the default (fused_loss auto; GPT.fused_loss None): where it was measured to
    pay. On a CPU it is as fast as the plain loss at half the peak memory (README, Speed). On CUDA the plain
    loss inside the compiled forward was measured (H200, 124M: 33.9 ms, 8.45 GiB) and the fused one was
    not, so auto stays plain there until benchmarks/gpu_check.sh shows the fused loss at least as fast."""
    return device_type != "cuda"


# Dense peaks in TFLOP/s (no sparsity) per GPU model: (bf16/fp16 tensor cores, float32 as training runs
# it: TF32 tensor cores where the card has them, which fit() enables, else plain fp32). Keyed by the model
# as torch.cuda.get_device_name() spells it, with the form factor where it changes the peak (gpu_model).
GPU_PEAK_TFLOPS = {
    "B200": (2250.0, 1100.0),
    "GH200": (989.0, 494.0),
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 NVL": (835.0, 418.0),
    "H100 PCIe": (756.0, 378.0),
    "A100": (312.0, 156.0),  # SXM4
    "A100 PCIe": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L40": (181.0, 90.5),
    "L4": (121.0, 60.0),
    "A10": (125.0, 62.5),
    "4090": (165.0, 82.6),  # GeForce RTX 4090, fp32 accumulation
    "V100": (125.0, 15.7),  # SXM2; no TF32
    "V100 PCIe": (112.0, 14.0),
    "T4": (65.0, 8.1),
}
_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "RTX", "QUADRO"}
_FORM_FACTORS = ("NVL", "PCIe")
# Words that name a smaller part than the model's: a MIG slice of the GPU, a cut-down or a laptop chip.
_LESSER_PARTS = {"MIG", "D", "LAPTOP", "MOBILE", "MAX", "Q"}


def gpu_model(gpu_name: str) -> str:
    """The table's key for a device name, matched on the whole name: its model ("NVIDIA L40" is an L40, not an
    L4) with its form factor ("NVIDIA H100 PCIe" -> "H100 PCIe", "Tesla V100-SXM2-16GB" -> "V100"). "" where
    the table has no figure for that part: a form factor it does not list ("NVIDIA H200 NVL"), a MIG slice, a
    4090 D or a laptop GPU: MFU is then n/a (--peak_tflops), never another part's figure."""
    words = [w for w in gpu_name.replace("-", " ").split() if w.upper() not in _VENDOR_WORDS]
    if not words or _LESSER_PARTS & {w.upper() for w in words[1:]}:
        return ""
    upper = [w.upper() for w in words[1:]]
    forms = [form for form in _FORM_FACTORS if form.upper() in upper]
    key = f"{words[0]} {forms[0]}" if forms else words[0]
    return key if key in GPU_PEAK_TFLOPS else ""


def peak_tflops_of(gpu_name: str, dtype: str) -> float:
    """The dense peak TFLOP/s of the GPU named so (torch.cuda.get_device_name) for dtype; 0 if unknown."""
    half, single = GPU_PEAK_TFLOPS.get(gpu_model(gpu_name), (0.0, 0.0))
    return single if dtype == "float32" else half
