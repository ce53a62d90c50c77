"""Steps to a target val loss: AdamW against Muon (--optimizer muon) on the same GPT-2 and data.

    python benchmarks/optimizer_steps.py                                  # the CPU reference below (45 min)
    python benchmarks/optimizer_steps.py --adamw_lrs 2e-3 --muon_lrs 4e-3    # its best pair only
    python benchmarks/optimizer_steps.py --data data/fineweb10B --n_layer 12 --n_embd 768 --block_size 1024 \
        --batch_size 16 --steps 2000 --eval_interval 250 --eval_tokens 1048576      # on a GPU

Each (optimizer, lr) pair trains the same model from the same initial weights on the same
batches with the real trainer (train.fit: warmup, cosine decay, clipping, the GradScaler),
evaluating every --eval_interval steps. For each optimizer the lr with the lowest final val
loss is its best; the target is AdamW's best final val loss. Printed: every run's final val
loss, each optimizer's steps (and tokens, and training seconds) to the target, the val loss
of both at equal steps and their training ms per step; with --step_times, the optimizer step
alone at GPT-2 124M's shapes (AdamW vs Muon, timed here, and the Newton-Schulz FLOPs as a
share of a training step, for a GPU estimate). Muon's AdamW part (embeddings, head, biases, gains)
trains at the best AdamW lr of the sweep.

The CPU reference: a 4-layer, 128-wide GPT-2 with GPT-2's real 50,304-row head on tiny
Shakespeare, 8 x 128 tokens per step, 400 steps (50 warmup, cosine to 10%), val on 16,384
tokens every 50 steps; the sweep is AdamW 1e-3, 2e-3, 4e-3 and Muon 2e-3, 4e-3, 8e-3.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before torch is imported, as launch/train.py does
    from gpt2repro.runtime import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()

import torch  # noqa: E402

from gpt2repro import config as C  # noqa: E402
from gpt2repro import distributed as D  # noqa: E402
from gpt2repro import rundir  # noqa: E402
from gpt2repro.model import GPT, GPTConfig  # noqa: E402
from gpt2repro.optim import NS_STEPS, MuonAdamW, is_muon_matrix  # noqa: E402
from gpt2repro.train import fit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prepared dataset (default: tiny Shakespeare, prepared into a temp dir)")
    p.add_argument("--out", help="keep the runs here (default: a temp dir)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--eval_interval", type=int, default=50)
    p.add_argument("--eval_tokens", type=int, default=16384)
    p.add_argument("--adamw_lrs", default="1e-3,2e-3,4e-3", help="AdamW's sweep")
    p.add_argument("--muon_lrs", default="2e-3,4e-3,8e-3", help="Muon's sweep (its matrices' lr)")
    p.add_argument(
        "--step_times",
        action="store_true",
        help="also time the optimizer step alone at GPT-2 124M's shapes (minutes on a CPU)",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or prepare_shakespeare(Path(tmp) / "shakespeare")
        out = Path(args.out or Path(tmp) / "runs")
        base = C.TrainConfig(
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            block_size=args.block_size,
            batch_size=args.batch_size,
            max_steps=args.steps,
            warmup_steps=args.warmup_steps,
            eval_interval=args.eval_interval,
            eval_tokens=args.eval_tokens,
            log_interval=args.eval_interval,
            ckpt_interval=args.steps,
            keep_ckpts=1,
            compile="false",
            min_lr=0.0,
        )
        adamw = {
            lr: train(base.replace(lr=lr, min_lr=lr / 10), data, out / f"adamw_lr{lr:g}")
            for lr in floats(args.adamw_lrs)
        }
        best_adamw_lr = min(adamw, key=lambda lr: adamw[lr]["val"][-1][1])
        muon = {
            lr: train(
                base.replace(optimizer="muon", muon_lr=lr, lr=best_adamw_lr, min_lr=best_adamw_lr / 10),
                data,
                out / f"muon_lr{lr:g}",
            )
            for lr in floats(args.muon_lrs)
        }
    results = report(adamw, muon, best_adamw_lr, base)
    if args.step_times:
        results["optimizer_step_124m"] = optimizer_step_times()
        print(format_step_times(results["optimizer_step_124m"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def prepare_shakespeare(out: Path) -> str:
    cmd = [
        sys.executable,
        str(REPO / "data_prep" / "prepare.py"),
        "--out",
        str(out),
        "--files",
        str(REPO / "examples" / "tinyshakespeare.txt"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return str(out)


def train(cfg: C.TrainConfig, data: str, run_dir: Path) -> dict:
    """One run of the real trainer; its val curve [(step, loss)] and median training ms per step."""
    cfg = C.resolve(cfg, 1)
    label = f"{cfg.optimizer} lr {cfg.muon_lr if cfg.optimizer == 'muon' else cfg.lr:g}"
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        fit(cfg, data, run_dir, D.DistInfo())
    records = rundir.read_metrics(run_dir)
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    ms = 1000 * cfg.batch_size * cfg.block_size / statistics.median(speeds)
    print(
        f"{label:>16}: val {val[-1][1]:.4f} after {val[-1][0]} steps, {ms:.0f} ms/step "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return {"val": val, "ms_per_step": ms, "tokens_per_step": cfg.batch_size * cfg.block_size}


def steps_to(val: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in val if loss <= target), None)


def report(adamw: dict, muon: dict, best_adamw_lr: float, base: C.TrainConfig) -> dict:
    best_muon_lr = min(muon, key=lambda lr: muon[lr]["val"][-1][1])
    a, m = adamw[best_adamw_lr], muon[best_muon_lr]
    target = a["val"][-1][1]
    a_steps, m_steps = steps_to(a["val"], target), steps_to(m["val"], target)
    lines = [
        f"\nbest: AdamW lr {best_adamw_lr:g}, Muon lr {best_muon_lr:g} (its AdamW part at {best_adamw_lr:g}); "
        f"target: AdamW's final val {target:.4f}"
    ]
    lines.append(f"{'':>8} {'steps':>7} {'tokens':>11} {'train s':>8} {'ms/step':>8}")
    for name, run, steps in (("AdamW", a, a_steps), ("Muon", m, m_steps)):
        if steps is None:
            lines.append(f"{name:>8} {'not reached':>7}")
            continue
        lines.append(
            f"{name:>8} {steps:>7} {steps * run['tokens_per_step']:>11,} "
            f"{steps * run['ms_per_step'] / 1000:>8.0f} {run['ms_per_step']:>8.0f}"
        )
    if a_steps and m_steps:
        lines.append(f"Muon reaches it in {m_steps / a_steps:.2f}x AdamW's steps")
    lines.append(
        "val loss at equal steps: "
        + ", ".join(f"{s}: {va:.3f} vs {vm:.3f}" for (s, va), (_, vm) in zip(a["val"], m["val"], strict=True))
    )
    print("\n".join(lines), flush=True)
    return {
        "best_adamw_lr": best_adamw_lr,
        "best_muon_lr": best_muon_lr,
        "target": target,
        "adamw_steps": a_steps,
        "muon_steps": m_steps,
        "adamw": adamw,
        "muon": muon,
        "config": base.to_dict(),
    }


def optimizer_step_times(repeats: int = 3) -> dict:
    """The optimizer step alone at GPT-2 124M's shapes on this machine (AdamW vs Muon, float32 Newton-Schulz
    on a CPU), and Newton-Schulz's FLOPs as a share of a 524,288-token training step's."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, pad_vocab_multiple=64)
    model = GPT(config)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    cfg = C.TrainConfig(optimizer="muon", dtype="float32")
    seconds = {}
    for name, optimizer in (
        ("adamw", torch.optim.AdamW(model.optim_groups(0.1), lr=1e-4, fused=True)),
        ("muon", MuonAdamW(model, cfg)),
    ):
        optimizer.step()  # state allocated
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        seconds[name] = statistics.median(times)
    ns_flops = sum(newton_schulz_flops(*p.shape) for n, p in model.named_parameters() if is_muon_matrix(n))
    step_flops = model.flops_per_token(1024) * 524_288
    return {"adamw_s": seconds["adamw"], "muon_s": seconds["muon"], "ns_flops": ns_flops, "step_flops": step_flops}


def newton_schulz_flops(rows: int, cols: int) -> float:
    """Per step: X X^T (2 m^2 n), the Gram matrix squared (2 m^3), that times X (2 m^2 n), m = min side."""
    m, n = min(rows, cols), max(rows, cols)
    return NS_STEPS * (4 * m * m * n + 2 * m**3)


def format_step_times(r: dict) -> str:
    share = r["ns_flops"] / r["step_flops"]
    return (
        f"\noptimizer step at GPT-2 124M's shapes on this machine: AdamW {1000 * r['adamw_s']:.0f} ms, Muon "
        f"{1000 * r['muon_s']:.0f} ms (float32 Newton-Schulz).\nNewton-Schulz FLOPs per step: "
        f"{r['ns_flops'] / 1e12:.2f} TFLOP, {100 * share:.2f}% of a 524,288-token training step "
        f"({r['step_flops'] / 1e12:.0f} TFLOP); under 8-GPU DDP every rank orthogonalises every matrix: "
        f"{800 * share:.1f}% of each GPU's share, at equal MFU"
    )


if __name__ == "__main__":
    main()
