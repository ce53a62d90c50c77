"""The named corpora, shared by data preparation (data_prep/) and the package (a reference judges a run
by the corpus its data came from): the hub's copy, and how the trainers that made them famous split off
val. nanoGPT draws ~0.05% of OpenWebText's documents; llm.c's dev/data/fineweb.py makes the corpus's
first shard of 100M tokens its val split (FineWeb's comes shuffled), so a val_loss here is measured on
the same tokens as llm.c's.
"""

from __future__ import annotations

from dataclasses import dataclass

OWT_DATASET = "Skylion007/openwebtext"
# OpenWebText ships as a loading script, which current datasets releases refuse
# ("Dataset scripts are no longer supported"); the hub's parquet export of the same
# data loads everywhere.
OWT_PARQUET_REVISION = "refs/convert/parquet"
LLMC_VAL_TOKENS = 100_000_000


@dataclass(frozen=True)
class NamedDataset:
    hub: str
    name: str | None
    revision: str | None
    val_first_tokens: int | None  # None: a random draw of documents


DATASETS = {
    "openwebtext": NamedDataset(OWT_DATASET, None, OWT_PARQUET_REVISION, None),
    "fineweb10B": NamedDataset("HuggingFaceFW/fineweb", "sample-10BT", None, LLMC_VAL_TOKENS),
    "fineweb-edu10B": NamedDataset("HuggingFaceFW/fineweb-edu", "sample-10BT", None, LLMC_VAL_TOKENS),
    "fineweb100B": NamedDataset("HuggingFaceFW/fineweb", "sample-100BT", None, LLMC_VAL_TOKENS),
    "fineweb-edu100B": NamedDataset("HuggingFaceFW/fineweb-edu", "sample-100BT", None, LLMC_VAL_TOKENS),
}


def dataset_name(hub: str, name: str | None) -> str | None:
    """The DATASETS name of a hub dataset (and configuration), if it has one."""
    return next((k for k, d in DATASETS.items() if (d.hub, d.name) == (hub, name)), None)
