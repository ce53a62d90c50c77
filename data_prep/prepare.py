"""Tokenise a corpus with GPT-2's BPE into llm.c-compatible uint16 shards plus a manifest.

    python data_prep/prepare.py --out data/owt                       # OpenWebText from the hub
    python data_prep/prepare.py --dataset fineweb10B --out data/fineweb10B    # llm.c's data and val split
    python data_prep/prepare.py --out data/shakespeare --files examples/tinyshakespeare.txt
    python data_prep/prepare.py --dataset fineweb10B --files sample/*.parquet --out data/fw   # a local copy
    python data_prep/prepare.py --verify data/owt

Every document becomes <|endoftext|> followed by tiktoken's encode_ordinary(text), in
corpus order; the stream is cut into fixed-size shards (documents may cross shards).
A seeded random draw of whole documents forms the val split; a corpus that is a single
document keeps its last 10% as val, as nanoGPT's Shakespeare prep does. The FineWeb
datasets (--dataset fineweb10B, fineweb-edu10B, ...) split as llm.c does instead: the
first 100M tokens of the stream are val (--val_first_tokens), the document that crosses
that point is cut there, and the rest is train.

Tokenisation runs on --num_proc processes with a bounded number of batches in flight,
so memory stays flat (about two shard buffers) at any corpus size. After each shard the
progress is checkpointed: killed at any moment and rerun with the same arguments, it
continues from the last checkpoint and produces byte-identical shards. manifest.json is
written last; a directory without one is never complete.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.sources import FilesSource, HubSource, PrepareError  # noqa: E402
from gpt2repro import shards  # noqa: E402
from gpt2repro.corpora import DATASETS  # noqa: E402
from gpt2repro.runtime import underscored  # noqa: E402
from gpt2repro.tokenizer import EOT_ID as EOT  # noqa: E402

TOKENIZER = "gpt2"
VOCAB_SIZE = 50257
OWT_VAL_FRACTION = 0.0005  # nanoGPT's OpenWebText val fraction, about 4,000 documents
STATE_NAME = ".prepare_state.json"


# ----- tokenisation (runs in worker processes) ----------------------------------------
_encoder = None


def _init_worker() -> None:
    global _encoder
    from gpt2repro.tokenizer import gpt2  # GPT-2's BPE ships with the package: no download

    _encoder = gpt2()


def tokenize_batch(texts: list[str], is_val: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """EOT + encode_ordinary(text) for each document, as (train tokens, val tokens) uint16 arrays."""
    eot = np.array([EOT], dtype=np.uint32)
    streams = {False: [], True: []}
    for text, val in zip(texts, is_val, strict=True):
        # disallowed_special=() encodes "<|endoftext|>" inside a text as plain text, exactly
        # as encode_ordinary does, but straight into a numpy array.
        streams[val] += (eot, _encoder.encode_to_numpy(text, disallowed_special=()))
    arrays = []
    for val in (False, True):
        ids = np.concatenate(streams[val]) if streams[val] else np.empty(0, dtype=np.uint32)
        if ids.size and ids.max() >= 1 << 16:
            raise PrepareError(f"Token id {int(ids.max())} does not fit in uint16; shards hold ids below 65536.")
        arrays.append(ids.astype(shards.TOKEN_DTYPE))
    return arrays[0], arrays[1]


# ----- shard writing with resumable state ----------------------------------------------
class SplitWriter:
    """Fills fixed-size shards of one split from a stream of token arrays."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, done: list[dict], partial: np.ndarray):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.done = done  # manifest entries of finished shards
        self.buffer = np.empty(0, dtype=shards.TOKEN_DTYPE)
        self.fill = 0
        self.wrote_shard = False
        self.add(partial)

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            needed = min(self.shard_tokens, self.fill + tokens.size)
            if needed > self.buffer.size:  # grow geometrically: a small split never costs a full shard of RAM
                grown = np.empty(min(self.shard_tokens, max(2 * self.buffer.size, needed)), dtype=shards.TOKEN_DTYPE)
                grown[: self.fill] = self.buffer[: self.fill]
                self.buffer = grown
            take = min(tokens.size, self.shard_tokens - self.fill)
            self.buffer[self.fill : self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        tokens = self.buffer[: self.fill]
        name = shards.shard_name(self.split, len(self.done))
        sha = shards.write_shard(self.out_dir / name, tokens)
        num_docs = int(np.count_nonzero(tokens == EOT))  # documents starting in this shard
        self.done.append({"file": name, "num_tokens": int(self.fill), "num_documents": num_docs, "sha256": sha})
        self.fill = 0
        self.wrote_shard = True

    @property
    def total_tokens(self) -> int:
        return sum(e["num_tokens"] for e in self.done) + self.fill

    @property
    def partial(self) -> np.ndarray:
        return self.buffer[: self.fill]


def save_state(
    out_dir: Path, build: dict, num_docs: int, next_doc: int, writers: dict[str, SplitWriter], generation: int
) -> None:
    """Checkpoint: finished shards, the next unread document and the unwritten tokens of each split.

    Partial-buffer files carry the generation in their name, so that the state file,
    replaced atomically last, always points at a matching set.
    """
    partial_files = {}
    for split, writer in writers.items():
        name = f".partial_{split}_{generation}.bin"
        shards.write_shard(out_dir / name, writer.partial)
        partial_files[split] = name
    state = {
        "build": build,
        "num_docs": num_docs,
        "next_doc": next_doc,
        "generation": generation,
        "shards": {s: w.done for s, w in writers.items()},
        "partial_files": partial_files,
    }
    shards.write_json_atomic(out_dir / STATE_NAME, state)
    for stale in out_dir.glob(".partial_*.bin"):
        if stale.name not in partial_files.values():
            stale.unlink()


def load_state(out_dir: Path, build: dict) -> dict | None:
    path = out_dir / STATE_NAME
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state["build"] != build:
        raise PrepareError(
            f"{out_dir} holds an unfinished preparation with different arguments or input "
            f"({_differences(state['build'], build)}); rerun with the same arguments or choose another --out."
        )
    for entries in state["shards"].values():
        for entry in entries:
            shards.check_shard(out_dir / entry["file"])
    # Shards written after the last state save (one batch can fill several): redone identically.
    recorded = {entry["file"] for entries in state["shards"].values() for entry in entries}
    for split in shards.SPLITS:
        for orphan in out_dir.glob(shards.shard_name(split, 0).replace("000000", "[0-9]" * 6)):
            if orphan.name not in recorded:
                orphan.unlink()
    return state


def remove_temp_files(out_dir: Path) -> None:
    """Temp files of shards.atomic_file (".NAME.XXXX.tmp"): never part of a finished dataset."""
    for stale in out_dir.glob(".*.tmp"):
        stale.unlink()


def same_build(old: dict, new: dict) -> bool:
    """The same preparation; a key a newer version added counts as None in an older build."""
    return all(old.get(k) == new.get(k) for k in set(old) | set(new))


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


# ----- the whole run -------------------------------------------------------------------
def choose_val_docs(num_docs: int, val_docs: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the val documents: a seeded draw without replacement."""
    if val_docs is None:
        val_docs = max(1, round(OWT_VAL_FRACTION * num_docs))
    if val_docs >= num_docs:
        raise PrepareError(
            f"--val_docs {val_docs} leaves no training documents in a corpus of {num_docs}; choose fewer."
        )
    return np.sort(np.random.default_rng(seed).choice(num_docs, size=val_docs, replace=False))


def document_batches(source, num_docs: int, val_idx: np.ndarray | None, skip_docs: int):
    """(texts, is_val, docs consumed) batches in corpus order, starting after skip_docs documents.
    val_idx None: no document is val as a whole (the val split is the stream's first tokens)."""
    seen = 0
    for texts in source.iter_texts():
        start, seen = seen, seen + len(texts)
        if seen <= skip_docs:
            continue
        if num_docs == 1 and val_idx is not None:  # one document (e.g. tiny Shakespeare): its tail becomes val
            cut = int(0.9 * len(texts[0]))
            yield [texts[0][:cut], texts[0][cut:]], [False, True], seen
            continue
        keep = max(0, skip_docs - start)
        indices = np.arange(start + keep, seen)
        is_val = np.isin(indices, val_idx).tolist() if val_idx is not None else [False] * len(indices)
        yield texts[keep:], is_val, seen


def make_writers(out_dir: Path, shard_tokens: int, state: dict | None) -> dict[str, SplitWriter]:
    writers = {}
    for split in shards.SPLITS:
        partial, done = np.empty(0, dtype=shards.TOKEN_DTYPE), []
        if state:
            partial = np.array(shards.open_tokens(shards.check_shard(out_dir / state["partial_files"][split])))
            done = state["shards"][split]
        writers[split] = SplitWriter(out_dir, split, shard_tokens, done, partial)
    return writers


class _NoBar:
    """Stands in for tqdm where it is not installed (a bare GPU image): the summary line still comes."""

    def update(self, n: int) -> None: ...
    def set_postfix_str(self, text: str) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="doc", mininterval=1.0, dynamic_ncols=True)


def tokenize_all(pool, num_proc, source, num_docs, val_idx, writers, out_dir, build, state) -> tuple[int, int]:
    """Feed document batches through the pool in order; checkpoint after each written shard.

    Returns (tokens written this run, documents read in all).
    """
    next_doc, generation = (state["next_doc"], state["generation"]) if state else (0, 0)
    num_tokens, t0 = 0, time.time()
    bar = progress_bar(num_docs, next_doc)
    in_flight: deque = deque()

    def consume() -> None:
        nonlocal next_doc, num_tokens, generation
        result, docs_end = in_flight.popleft()
        train, val = result.get()
        if build["val_first_tokens"] is not None:  # llm.c's split: the stream's first tokens are val
            need = max(0, build["val_first_tokens"] - writers["val"].total_tokens)
            train, val = train[need:], train[:need]
        for split, tokens in zip(shards.SPLITS, (train, val), strict=True):
            writers[split].add(tokens)
            num_tokens += tokens.size
        bar.update(docs_end - next_doc)
        bar.set_postfix_str(f"{num_tokens / (time.time() - t0):,.0f} tok/s")
        next_doc = docs_end
        if any(w.wrote_shard for w in writers.values()):
            generation += 1
            save_state(out_dir, build, num_docs, next_doc, writers, generation)
            for w in writers.values():
                w.wrote_shard = False

    try:
        for texts, is_val, docs_end in document_batches(source, num_docs, val_idx, next_doc):
            in_flight.append((pool.apply_async(tokenize_batch, (texts, is_val)), docs_end))
            if len(in_flight) > 2 * num_proc:  # bounded: memory stays flat
                consume()
        while in_flight:
            consume()
    finally:
        bar.close()  # before any error message, so that the message is the last line
    return num_tokens, next_doc


def prepare(args: argparse.Namespace) -> int:
    source = make_source(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    build = {
        "tokenizer": TOKENIZER,
        "source": source.describe(),
        "shard_tokens": args.shard_tokens,
        "val_docs": args.val_docs,
        "seed": args.seed,
        "val_first_tokens": val_first_tokens(args),
    }
    manifest = shards.read_manifest(out_dir)
    if manifest is not None:
        if not same_build(manifest.get("build", {}), build):
            raise PrepareError(
                f"{out_dir} already holds a different prepared dataset "
                f"({_differences(manifest.get('build', {}), build)}); choose another --out."
            )
        print(f"{out_dir} is already complete ({manifest['splits']['train']['num_tokens']:,} train tokens).")
        return 0
    state = load_state(out_dir, build)
    if state is None and any(out_dir.glob("*.bin")):
        raise PrepareError(f"{out_dir} holds shard files but no preparation state or manifest; choose an empty --out.")
    remove_temp_files(out_dir)  # left by a run killed mid-write

    t0 = time.time()
    # Workers start (and import tiktoken) while the main process counts the documents.
    with mp.get_context("spawn").Pool(args.num_proc, initializer=_init_worker) as pool:
        num_docs = source.count_documents()
        if num_docs == 0:
            raise PrepareError("The corpus has no documents; check the input files or dataset split.")
        if state and state["num_docs"] != num_docs:
            raise PrepareError(
                f"{out_dir} holds an unfinished preparation of {state['num_docs']} documents, but the input now "
                f"has {num_docs}; rerun with the original input or choose another --out."
            )
        val_idx = None if build["val_first_tokens"] is not None else np.empty(0, np.int64)
        if val_idx is not None and num_docs > 1:
            val_idx = choose_val_docs(num_docs, args.val_docs, args.seed)
        writers = make_writers(out_dir, args.shard_tokens, state)
        if state is None:  # from now on a state file always exists beside our shard files
            save_state(out_dir, build, num_docs, 0, writers, generation=0)
        num_tokens, docs_read = tokenize_all(
            pool, args.num_proc, source, num_docs, val_idx, writers, out_dir, build, state
        )
    if docs_read != num_docs:
        raise PrepareError(f"Counted {num_docs} documents but read {docs_read}; is an input file changing?")

    for writer in writers.values():
        writer.flush()
    if writers["train"].total_tokens == 0:
        raise PrepareError(
            f"--val_first_tokens {build['val_first_tokens']:,} takes the whole corpus "
            f"({writers['val'].total_tokens:,} tokens) and leaves no training tokens; choose fewer."
        )
    manifest = make_manifest(build, writers)
    shards.write_json_atomic(out_dir / shards.MANIFEST_NAME, manifest)  # last: marks the directory complete
    (out_dir / STATE_NAME).unlink(missing_ok=True)
    for stale in out_dir.glob(".partial_*.bin"):
        stale.unlink()
    remove_temp_files(out_dir)
    seconds = time.time() - t0
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(
        f"done: {num_docs:,} documents, {train['num_tokens']:,} train + {val['num_tokens']:,} val tokens, "
        f"{len(train['shards'])} + {len(val['shards'])} shards, {seconds:.1f} s, "
        f"{num_tokens / seconds:,.0f} tokens/s this run -> {out_dir}"
    )
    return 0


def make_manifest(build: dict, writers: dict[str, SplitWriter]) -> dict:
    splits = {}
    for split, writer in writers.items():
        splits[split] = {
            "num_tokens": sum(e["num_tokens"] for e in writer.done),
            "num_documents": sum(e["num_documents"] for e in writer.done),
            "shards": writer.done,
        }
    return {
        "format_version": shards.MANIFEST_VERSION,
        "tokenizer": TOKENIZER,
        "eot_token": EOT,
        "vocab_size": VOCAB_SIZE,
        "dtype": "uint16",
        "header": {"magic": shards.MAGIC, "version": shards.VERSION, "ints": shards.HEADER_INTS},
        "source": build["source"],
        "build": build,
        "splits": splits,
    }


def make_source(args: argparse.Namespace):
    """Local files (of a named dataset, with --dataset), a named dataset's hub copy, or any hub dataset."""
    if args.files:
        return FilesSource(tuple(args.files), args.text_field, args.dataset)
    named = DATASETS.get(args.dataset)
    if named is not None:
        return HubSource(named.hub, named.name, args.split, args.revision or named.revision, args.text_field)
    return HubSource(args.dataset, args.name, args.split, args.revision, args.text_field)


def val_first_tokens(args: argparse.Namespace) -> int | None:
    """How many of the stream's first tokens are val (llm.c's split), or None (nanoGPT's: whole documents)."""
    if args.val_first_tokens is not None:
        return args.val_first_tokens
    named = DATASETS.get(args.dataset)
    return named.val_first_tokens if named is not None and args.val_docs is None else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output directory for shards and manifest.json")
    p.add_argument("--verify", metavar="DIR", help="re-hash every shard of DIR against its manifest, then exit")
    p.add_argument(
        "--dataset",
        default=None,
        help=f"{', '.join(DATASETS)}, or a Hugging Face dataset id (default openwebtext); with --files: "
        "which of those names the files hold (a local copy)",
    )
    p.add_argument("--name", default=None, help="dataset configuration name")
    p.add_argument("--split", default="train", help="dataset split to read (default train)")
    p.add_argument("--revision", default=None, help="dataset revision (OpenWebText: its parquet export)")
    p.add_argument("--files", nargs="+", help="local .jsonl/.json/.parquet/.txt files instead of a hub dataset")
    p.add_argument("--text_field", default="text", help="column holding the text (default text)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    p.add_argument("--val_docs", type=int, default=None, help="val documents (default 0.0005 of the corpus)")
    p.add_argument(
        "--val_first_tokens",
        type=int,
        default=None,
        help="the first N tokens are val, as llm.c (default for the FineWeb datasets: 100M)",
    )
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokeniser processes (default: all cores)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the val draw")
    args = p.parse_args(underscored(sys.argv[1:] if argv is None else argv))
    if bool(args.out) == bool(args.verify):
        p.error("pass exactly one of --out DIR (prepare) or --verify DIR")
    for name in ("shard_tokens", "num_proc"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.val_docs is not None and args.val_docs < 1:
        p.error("--val_docs must be at least 1")
    if args.val_first_tokens is not None and args.val_first_tokens < 1:
        p.error("--val_first_tokens must be at least 1")
    if args.val_docs is not None and args.val_first_tokens is not None:
        p.error("pass one of --val_docs (whole documents) or --val_first_tokens (the stream's first tokens)")
    if args.files and args.dataset is not None and args.dataset not in DATASETS:
        p.error(f"with --files, --dataset names the dataset the files hold: one of {', '.join(DATASETS)}")
    if not args.files and args.dataset is None:
        args.dataset = "openwebtext"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.verify:
            problems = shards.verify(args.verify)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            if not problems:
                print(f"ok: every shard in {args.verify} matches its manifest")
            return 1 if problems else 0
        return prepare(args)
    except (PrepareError, shards.ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
