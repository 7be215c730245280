"""Datasets from local files (no network): what ``grpo-fast train --dataset`` and the R1 recipe read."""

from __future__ import annotations

from pathlib import Path

from .configio import ConfigError, expand_path

DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_data_file(path: str, columns: tuple[str, ...] = ()):
    """A local json/jsonl/csv/parquet file as a ``datasets.Dataset`` (no network); ``~`` and ``$VAR`` in
    the path are expanded.

    Raises:
        FileNotFoundError or ConfigError, one line naming the file: it is missing, empty, not readable as
        its format, or lacks one of ``columns``.
    """
    from datasets import load_dataset

    path = expand_path(path, "dataset file")
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_FORMATS:
        raise ConfigError(f"dataset file must end in one of {sorted(DATA_FORMATS)}, got {path!r}")
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise FileNotFoundError(f"dataset file {path} {what}")
    if Path(path).stat().st_size == 0:
        raise ConfigError(f"dataset file {path} is empty; it needs rows with a 'prompt' column")
    try:
        dataset = load_dataset(DATA_FORMATS[suffix], data_files=path, split="train")
    except Exception as error:  # datasets' and pyarrow's many parse errors: the file is at fault
        cause = " ".join(f"{error} {error.__cause__ or ''}".split())[:300]
        raise ConfigError(f"dataset file {path} is not readable as {DATA_FORMATS[suffix]} ({cause})") from error
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ConfigError(f"dataset file {path} has no {missing[0]!r} column (its columns: "
                          f"{', '.join(dataset.column_names)})")  # fmt: skip
    return dataset
