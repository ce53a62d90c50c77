"""Where training numbers go: metrics.jsonl (the contract), the console, W&B; MFU and throughput."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

import torch

from gpt2repro.shards import atomic_file, write_json_atomic

# Dense peaks in TFLOP/s (no sparsity), matched against the device name, the more specific
# names first: (bf16/fp16 tensor cores, float32 as training runs it: TF32 tensor cores where
# the card has them, which fit() enables, else plain fp32).
GPU_PEAK_TFLOPS = (
    ("B200", 2250.0, 1100.0),
    ("H200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.0),
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 181.0),
    ("A10", 125.0, 62.5),
    ("L4", 121.0, 60.0),
    ("4090", 165.0, 82.6),
    ("V100", 125.0, 15.7),
)


def peak_flops(device: str, stated_tflops: float = 0.0, dtype: str = "bfloat16") -> float | None:
    """The accelerator's peak in FLOP/s for dtype: the stated one, else from the table; None if unknown."""
    if stated_tflops > 0:
        return stated_tflops * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, half, single in GPU_PEAK_TFLOPS:
        if key in name:
            return (single if dtype == "float32" else half) * 1e12
    return None


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    return None if peak is None else flops_per_token * tokens_per_s_per_device / peak


class MetricsLog:
    """RUN_DIR/metrics.jsonl: one JSON object per logged step. Written by the main rank only."""

    def __init__(self, path: str | os.PathLike, resume_step: int):
        self.path = Path(path)
        if self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the whole run)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the step we resume from: they are about to be logged again."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", math.inf) <= step:
                kept.append(line + "\n")
        with atomic_file(self.path, "w") as f:
            f.write("".join(kept))

    def write(self, record: dict) -> None:
        # NaN and Infinity are not JSON: strict readers reject them. A non-finite value is null.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """W&B logging on the main rank; a resumed run continues the same W&B run id."""

    def __init__(self, mode: str, run_dir: Path, project: str, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ValueError(
                f"--wandb {mode} needs the wandb package: pip install wandb, or use --wandb disabled."
            ) from None

        id_file = run_dir / "wandb_id.json"
        run_id = json.loads(id_file.read_text())["id"] if id_file.exists() else secrets.token_hex(4)
        write_json_atomic(id_file, {"id": run_id})
        self.run = wandb.init(
            project=project, name=name or run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
            mode=mode, config=config,
        )  # fmt: skip

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def format_line(record: dict, max_steps: int, eta_s: float | None) -> str:
    """One console line: the training numbers of a log step, then eval and checkpoint costs if any."""
    parts = [f"step {record['step']:>6}/{max_steps}"]
    if "loss" in record:
        parts.append("loss " + ("nan" if record["loss"] is None else f"{record['loss']:.4f}"))
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    if "hellaswag_acc_norm" in record:
        parts.append(f"hellaswag {record['hellaswag_acc_norm']:.4f}")
    if "loss" in record:
        parts += [f"lr {record['lr']:.2e}", f"grad {record['grad_norm']:.3f}"]
        if record.get("tokens_per_s") is not None:  # none at a run's first step (compilation)
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
    parts += [f"{key} {record[f'{key}_s']:.1f}s" for key in ("eval", "ckpt") if f"{key}_s" in record]
    if eta_s is not None and math.isfinite(eta_s):
        h, rem = divmod(int(eta_s), 3600)
        parts.append(f"eta {h}:{rem // 60:02d}:{rem % 60:02d}")
    return " | ".join(parts)
