"""Datasets from local files (no network): what ``grpo-fast train --dataset`` and the R1 recipe read."""

from __future__ import annotations

from pathlib import Path

from ..optional import require
from .configio import ConfigError

DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_data_file(path: str):
    """A local json/jsonl/csv/parquet file as a ``datasets.Dataset`` (no network)."""
    load_dataset = require("datasets", f"reading the data file {path}").load_dataset
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_FORMATS:
        raise ConfigError(f"dataset file must end in one of {sorted(DATA_FORMATS)}, got {path!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    return load_dataset(DATA_FORMATS[suffix], data_files=path, split="train")
