"""CUDA on this CPU-only build, for tests of the package's CUDA-only branches.

    with fake_gpu("sm90"):           torch.cuda answers as one H100 would (capability, name, memory), so the
                                     policies (dtype, fp8, compile, fused loss, MFU peak) decide as on it
    with fake_gpu("sm90") as mode:   and `mode` (a FakeTensorMode) makes `cuda` tensors: no values, real
        cuda_parameters(model, mode) shapes, devices and dtypes

On this CPU-only build a fake CUDA tensor runs factories, matmuls (out_dtype too), split, narrow,
reductions and in-place arithmetic; Python indexing, copy_ into a view, .contiguous(), .to("cuda")
and autocast's casts need a CUDA device guard and fail or end the process. So a whole model forward
cannot run here; the fused loss (written with split/narrow) can.

Three techniques, each for what it can show:
- policies under faked device properties (this module's fake_gpu);
- device and dtype flow on fake CUDA tensors (FakeTensorMode: tensors are made by factories on
  "cuda", never copied there; autograd on them aborts, so an autograd.Function's forward and
  backward are called directly);
- Inductor lowering of a branch traced on CPU tensors with the branch forced (lowering is the same
  on every device up to the kernel chosen; tests/unit/test_cuda_paths.py).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

GiB = 1024**3

# (compute capability, what torch.cuda.get_device_name says, memory): one card of each generation.
GPUS = {
    "sm70": ((7, 0), "Tesla V100-SXM2-32GB", 32 * GiB),
    "sm75": ((7, 5), "Tesla T4", 15 * GiB),
    "sm80": ((8, 0), "NVIDIA A100-SXM4-80GB", 80 * GiB),
    "sm89": ((8, 9), "NVIDIA L4", 22 * GiB),
    "sm90": ((9, 0), "NVIDIA H100 80GB HBM3", 80 * GiB),
}


@contextlib.contextmanager
def fake_gpu(kind: str):
    """torch.cuda as on one GPU of `kind` (a key of GPUS); yields a FakeTensorMode for cuda tensors."""
    (major, minor), name, memory = GPUS[kind]
    props = SimpleNamespace(major=major, minor=minor, name=name, total_memory=memory, multi_processor_count=108)
    patches = [
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=1),
        mock.patch("torch.cuda.current_device", return_value=0),
        mock.patch("torch.cuda.set_device"),
        mock.patch("torch.cuda.get_device_capability", return_value=(major, minor)),
        mock.patch("torch.cuda.get_device_name", return_value=name),
        mock.patch("torch.cuda.get_device_properties", return_value=props),
        # CUDA's own answer, emulation included (sm70/75 say yes): what torch.autocast("cuda") asks.
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield FakeTensorMode(allow_non_fake_inputs=False)


def cuda_parameters(model: torch.nn.Module, mode: FakeTensorMode, dtype: torch.dtype | None = None):
    """model with every parameter replaced by a fake cuda one of its shape, and its dtype or `dtype` (ties kept)."""
    replaced: dict[int, torch.nn.Parameter] = {}
    with mode:
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) not in replaced:
                    fake = torch.empty(p.shape, dtype=dtype or p.dtype, device="cuda")
                    replaced[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                setattr(module, name, replaced[id(p)])
    return model
