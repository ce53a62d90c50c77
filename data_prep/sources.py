"""Where documents come from: a Hugging Face dataset (streamed) or local json/parquet/txt files.

Hub datasets and parquet files read through the datasets library; .txt, .jsonl and .json
files are read here with the standard library, so local text needs only the core install
(the same documents, in the same order, as datasets' own json and text builders give:
tests/unit/test_data_prep.py checks). Everything streams, so a corpus never has to fit in
memory. Every problem with the input is raised as PrepareError with one sentence that names
the file or field and what to do.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BATCH_DOCS = 256
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


class PrepareError(ValueError):
    """Bad input for data preparation; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class HubSource:
    dataset: str
    name: str | None
    split: str
    revision: str | None
    text_field: str

    def describe(self) -> dict:
        return {
            "kind": "hub",
            "dataset": self.dataset,
            "name": self.name,
            "split": self.split,
            "revision": self.revision,
            "text_field": self.text_field,
        }

    def _load(self):
        load_dataset = _datasets_loader()
        try:
            return load_dataset(self.dataset, self.name, split=self.split, revision=self.revision, streaming=True)
        except Exception as e:
            raise PrepareError(
                f"Could not open dataset {self.dataset!r} (name={self.name}, split={self.split}, "
                f"revision={self.revision}): {_first_line(e)}. Check the name and your network, or use --files."
            ) from None

    def count_documents(self) -> int:
        ds = self._load()
        info = ds.info.splits.get(self.split) if ds.info and ds.info.splits else None
        if info is not None and info.num_examples:
            return int(info.num_examples)
        return sum(len(batch) for batch in self.iter_texts())

    def iter_texts(self) -> Iterator[list[str]]:
        ds = self._load()
        _check_field(ds.column_names, self.text_field, self.dataset)
        yield from _iter_field(ds, self.text_field, self.dataset)


@dataclass(frozen=True)
class FilesSource:
    files: tuple[str, ...]
    text_field: str
    dataset: str | None = None  # the DATASETS name of what the files hold (a local copy), if given

    def __post_init__(self) -> None:
        for f in self.files:
            if not Path(f).is_file():
                raise PrepareError(f"Input file {f} does not exist; check the --files paths.")
            if Path(f).suffix.lower() not in FILE_BUILDERS:
                raise PrepareError(
                    f"Input file {f} has an unsupported extension; use {', '.join(FILE_BUILDERS)} files."
                )

    def describe(self) -> dict:
        files = [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size} for f in self.files]
        described = {"kind": "files", "files": files, "text_field": self.text_field}
        return described | ({"dataset": self.dataset} if self.dataset else {})

    def _groups(self):
        """Consecutive files of one kind load together, in the order given."""
        kind = lambda f: FILE_BUILDERS[Path(f).suffix.lower()]  # noqa: E731
        for builder, group in itertools.groupby(self.files, key=kind):
            yield builder, list(group)

    def _load(self, builder: str, files: list[str]):
        load_dataset = _datasets_loader()
        try:
            return load_dataset(builder, data_files=files, split="train", streaming=True)
        except Exception as e:
            raise PrepareError(f"Could not read {_names(files)}: {_first_line(e)}.") from None

    def count_documents(self) -> int:
        total = 0
        for builder, files in self._groups():
            if builder == "parquet":
                total += sum(_parquet_rows(f, self.text_field) for f in files)
            elif builder == "text":
                total += len(files)
            elif all(f.lower().endswith(".jsonl") for f in files):
                total += sum(_jsonl_rows(f) for f in files)
            else:
                total += sum(len(batch) for batch in self._iter_group(builder, files, self.text_field))
        return total

    def _iter_group(self, builder: str, files: list[str], field: str) -> Iterator[list[str]]:
        if builder == "text":  # a .txt file is one document (universal newlines, as datasets reads it)
            for f in files:
                yield [_read_text(f)]
            return
        if builder == "json":
            for f in files:
                yield from _batched(_json_texts(f, field))
            return
        ds = self._load(builder, files)
        _check_field(ds.column_names, field, _names(files))
        yield from _iter_field(ds.select_columns([field]), field, _names(files))

    def iter_texts(self) -> Iterator[list[str]]:
        for builder, files in self._groups():
            yield from self._iter_group(builder, files, self.text_field)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it first.") from None


def _json_texts(path: str, field: str) -> Iterator[str]:
    """The `field` of each record of a JSON Lines file, or of a .json file holding one array of records."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if path.lower().endswith(".json") and head.startswith("["):
        try:
            records = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
        for i, record in enumerate(records):
            yield _field_of(record, field, f"record {i} of {path}")
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line in ("\n", ""):  # a blank line holds no record (_jsonl_rows does not count it)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"Line {n} of {path} is not valid JSON ({e.msg}); is the file complete?") from None
            yield _field_of(record, field, f"line {n} of {path}")


def _field_of(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        fields = f" (fields: {', '.join(record)})" if isinstance(record, dict) else ""
        raise PrepareError(f"{where} has no field {field!r}{fields}; pass the right one with --text_field.")
    text = record[field]
    if not isinstance(text, str):
        raise PrepareError(
            f"Field {field!r} in {where} holds a {type(text).__name__}, not text; pick a text column with --text_field."
        )
    return text


def _batched(texts: Iterator[str]) -> Iterator[list[str]]:
    while batch := list(itertools.islice(texts, BATCH_DOCS)):
        yield batch


def _datasets_loader():
    """datasets.load_dataset, imported without torch and quiet: our errors say what went wrong in one line,
    and datasets' own logs and bars would repeat it."""
    # datasets imports torch when it is installed (seconds of start-up; data_prep stays torch-free by
    # design). Set here, in the process that loads data, never at import: a training process that
    # imports this module keeps its environment.
    os.environ.setdefault("USE_TORCH", "0")
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    return datasets.load_dataset


def _iter_field(ds, field: str, where: str) -> Iterator[list[str]]:
    batches = ds.iter(batch_size=BATCH_DOCS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except PrepareError:
            raise
        except Exception as e:
            raise PrepareError(f"Could not read {where}: {_first_line(e)}. Is the file complete and valid?") from None
        if field not in batch:
            _check_field(list(batch), field, where)
        texts = batch[field]
        for text in texts:
            if not isinstance(text, str):
                raise PrepareError(
                    f"Field {field!r} in {where} holds a {type(text).__name__}, not text; pick a text column "
                    "with --text_field."
                )
        yield texts


def _check_field(columns, field: str, where: str) -> None:
    if columns is not None and field not in columns:
        raise PrepareError(
            f"{where} has no field {field!r} (fields: {', '.join(columns)}); pass the right one with --text_field."
        )


def _parquet_rows(path: str, field: str) -> int:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:
        raise PrepareError(f"Could not read {path}: {_first_line(e)}. Is it a complete parquet file?") from None
    _check_field(parquet.schema_arrow.names, field, path)
    return parquet.metadata.num_rows


def _jsonl_rows(path: str, chunk_bytes: int = 1 << 24) -> int:
    """Non-empty lines of a JSON Lines file, counted on raw bytes (no parsing)."""
    import numpy as np

    rows, prev_newline = 0, True  # a line starts wherever a non-newline byte follows a newline
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            newline = np.frombuffer(chunk, dtype=np.uint8) == ord("\n")
            rows += int(prev_newline and not newline[0]) + int(np.count_nonzero(newline[:-1] & ~newline[1:]))
            prev_newline = bool(newline[-1])
    return rows


def _names(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else type(e).__name__
