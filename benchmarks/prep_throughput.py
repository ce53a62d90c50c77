"""Data-prep throughput: our prepare.py end to end against raw tiktoken, plus peak memory.

    python benchmarks/prep_throughput.py                 # a generated ~200 MB jsonl corpus
    python benchmarks/prep_throughput.py --files my.jsonl --num_proc 8

Prints tokens/s for (1) data_prep/prepare.py end to end (read -> shards on disk, process
start included) and (2) tiktoken encode_ordinary alone over the same documents, already in
memory, on the same number of processes: the limit. Also the peak resident memory of
prepare.py's whole process tree (main process and tokeniser workers, summed).
prepare.py's fixed start-up (about 2 s here: Python, datasets, worker spawn) weighs on
small corpora; OpenWebText takes an hour.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpt2repro.runtime import underscored  # noqa: E402


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """Documents of 200 B to 20 kB cut from tiny Shakespeare, shuffled: OWT-like lengths."""
    text = (REPO / "examples" / "tinyshakespeare.txt").read_text()
    rng = random.Random(seed)
    written = 0
    with open(path, "w") as f:
        while written < megabytes * 1e6:
            n = int(rng.lognormvariate(8.3, 0.8)) + 200
            start = rng.randrange(0, len(text) - n)
            f.write(json.dumps({"text": text[start : start + n]}) + "\n")
            written += n


def _read_texts(files: list[str], text_field: str) -> list[str]:
    from datasets import load_dataset

    ds = load_dataset("json", data_files=files, split="train")
    return ds[text_field]


_enc = None


def _init() -> None:
    global _enc
    from gpt2repro.tokenizer import gpt2

    _enc = gpt2()


def _encode(texts: list[str]) -> int:
    return sum(len(_enc.encode_ordinary(t)) for t in texts)


def raw_tiktoken(texts: list[str], num_proc: int) -> tuple[int, float]:
    chunks = [texts[i : i + 256] for i in range(0, len(texts), 256)]
    with mp.get_context("spawn").Pool(num_proc, initializer=_init) as pool:
        pool.map(_encode, chunks[:num_proc])  # warm up the workers
        t0 = time.perf_counter()
        n = sum(pool.map(_encode, chunks))
        return n, time.perf_counter() - t0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            rss_pages = int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += rss_pages * os.sysconf("SC_PAGE_SIZE")
    return total


def run_prepare(files: list[str], out_dir: Path, num_proc: int) -> tuple[float, int, str]:
    cmd = [sys.executable, str(REPO / "data_prep/prepare.py"), "--out", str(out_dir), "--files", *files]
    cmd += ["--num_proc", str(num_proc)]  # default 100M-token shards: the real memory footprint
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prepare.py failed with exit code {proc.returncode}")
    return seconds, peak, proc.stdout.read().strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="+", help="jsonl corpus files (default: generate one)")
    p.add_argument("--megabytes", type=float, default=200.0, help="size of the generated corpus")
    p.add_argument("--num_proc", type=int, default=os.cpu_count())
    p.add_argument("--text_field", default="text")
    args = p.parse_args(underscored(sys.argv[1:]))

    with tempfile.TemporaryDirectory() as tmp:
        files = args.files
        if not files:
            files = [str(Path(tmp) / "corpus.jsonl")]
            make_corpus(Path(files[0]), args.megabytes)
        seconds, peak_rss, summary = run_prepare(files, Path(tmp) / "out", args.num_proc)
        manifest = json.loads((Path(tmp) / "out/manifest.json").read_text())
        ours_tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
        texts = _read_texts(files, args.text_field)
        raw_tokens, raw_seconds = raw_tiktoken(texts, args.num_proc)

    ours, limit = ours_tokens / seconds, raw_tokens / raw_seconds
    print(f"corpus: {len(texts):,} documents, {raw_tokens:,} tokens; {args.num_proc} processes; {os.cpu_count()} cores")
    print(f"prepare.py end to end: {ours:,.0f} tokens/s ({seconds:.1f} s, peak RSS {peak_rss / 2**20:,.0f} MiB)")
    print(f"raw tiktoken limit:    {limit:,.0f} tokens/s ({raw_seconds:.1f} s)")
    print(f"ratio: {ours / limit:.1%} of the limit")
    print(f"prepare.py said: {summary}")


if __name__ == "__main__":
    main()
