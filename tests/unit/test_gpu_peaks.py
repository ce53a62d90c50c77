"""MFU's denominator for each card, by the name torch.cuda.get_device_name() gives it: dense bf16 and
float32-as-trained (TF32) peaks from NVIDIA's datasheets (sparsity figures halved). A name is matched whole:
an L40 is not an L4, an H100 NVL or PCIe is not the SXM part, an A10G is not an A10, a MIG slice is not its
GPU."""

import pytest

from gpt2repro import settings
from gpt2repro.config import TrainConfig

CARDS = [  # (device name, dense bf16 TFLOP/s, TF32 (float32 as trained) TFLOP/s)
    ("NVIDIA H100 80GB HBM3", 989.0, 494.0),  # SXM5
    ("NVIDIA H100 PCIe", 756.0, 378.0),
    ("NVIDIA H100 NVL", 835.0, 418.0),
    ("NVIDIA H200", 989.0, 494.0),
    ("NVIDIA GH200 480GB", 989.0, 494.0),
    ("NVIDIA B200", 2250.0, 1100.0),
    ("NVIDIA A100-SXM4-80GB", 312.0, 156.0),
    ("NVIDIA A100-SXM4-40GB", 312.0, 156.0),
    ("NVIDIA A100 80GB PCIe", 312.0, 156.0),
    ("NVIDIA L40S", 362.0, 183.0),
    ("NVIDIA L40", 181.0, 90.5),
    ("NVIDIA L4", 121.0, 60.0),
    ("NVIDIA A10", 125.0, 62.5),
    ("NVIDIA GeForce RTX 4090", 165.0, 82.6),
    ("Tesla V100-SXM2-16GB", 125.0, 15.7),  # no TF32: plain fp32
    ("Tesla V100-PCIE-32GB", 112.0, 14.0),
    ("Tesla T4", 65.0, 8.1),
    # Parts the table has no figure for: MFU n/a (--peak_tflops), never a figure of another part.
    ("NVIDIA A10G", 0.0, 0.0),  # not the A10
    ("NVIDIA H200 NVL", 0.0, 0.0),  # not the SXM H200
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 0.0, 0.0),  # a seventh of the GPU
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 0.0, 0.0),
    ("NVIDIA GeForce RTX 4090 D", 0.0, 0.0),  # fewer SMs than the 4090
    ("NVIDIA GeForce RTX 4090 Laptop GPU", 0.0, 0.0),  # another chip
    ("NVIDIA RTX A6000", 0.0, 0.0),
    ("AMD Instinct MI300X", 0.0, 0.0),
]


@pytest.mark.parametrize("name,bf16,tf32", CARDS, ids=[c[0] for c in CARDS])
def test_the_settled_mfu_peak_is_the_named_cards(name, bf16, tf32):
    gpu = settings.Machine("cuda", gpu_memory_bytes=40e9, gpu_name=name)
    assert settings.settle(TrainConfig(dtype="bfloat16"), gpu).peak_tflops == bf16
    assert settings.settle(TrainConfig(dtype="float16"), gpu).peak_tflops == bf16
    assert settings.settle(TrainConfig(dtype="float32"), gpu).peak_tflops == tf32
