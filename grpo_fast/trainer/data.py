"""Datasets: local files (``grpo-fast train --dataset`` and the R1 recipe), TRL's ``dataset_name`` (a Hub id,
a ``save_to_disk`` directory or a file) and the column mapping and chat prompts the trainer reads.
``datasets`` is imported where data is read."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..optional import require
from .configio import ConfigError, expand_path

logger = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as on the Hugging Face Hub
DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_data_file(path: str, columns: tuple[str, ...] = ()):
    """A local json/jsonl/csv/parquet file as a ``datasets.Dataset`` (no network); ``~`` and ``$VAR`` in
    the path are expanded.

    Raises:
        FileNotFoundError or ConfigError, one line naming the file: it is missing, empty, not readable as
        its format, or lacks one of ``columns``.
    """
    load_dataset = require("datasets", f"reading the data file {path}").load_dataset
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


def load_named_dataset(name: str, config: str | None = None, train_split: str = "train",
                       test_split: str | None = None):  # fmt: skip
    """TRL's ``dataset_name``: (train, test or None) from a data file (one split: train), a directory saved
    with ``save_to_disk`` (a DatasetDict's splits, or a Dataset as train) or a Hub id (``datasets.load_dataset``
    with ``config``, through its cache: offline once cached). ``test_split`` None = "test" when there is one.

    Raises:
        ConfigError (one line): a Hub dataset that cannot be loaded (naming it and ``HF_HUB_OFFLINE``), a
        directory not saved by ``save_to_disk``, a split the dataset does not have.
    """
    local = Path(expand_path(name, "dataset_name"))
    if config is not None and local.exists():
        raise ConfigError(f"dataset_config {config!r} applies to Hub datasets; {name} is a local "
                          f"{'directory' if local.is_dir() else 'file'}: leave dataset_config out")  # fmt: skip
    if local.suffix.lower() in DATA_FORMATS and not local.is_dir():
        if test_split is not None or train_split != "train":
            raise ConfigError(f"dataset_name {name} is a data file, which has one split: leave dataset_train_split "
                              "and dataset_test_split out (eval_dataset takes a second file)")  # fmt: skip
        return load_data_file(str(local)), None
    if not local.is_dir() and (not _HUB_ID.match(name) or Path(name.split("/")[0]).is_dir()):
        raise FileNotFoundError(f"dataset_name {name} does not exist here and is no Hub id (org/name, org not a local "
                                "directory); check the path")  # fmt: skip
    splits = _load_from_disk(local) if local.is_dir() else _load_from_hub(name, config)
    if not hasattr(splits, "keys"):  # a Dataset saved alone: its rows are the train split
        splits = {"train": splits}
    return _split(splits, name, train_split, "dataset_train_split"), _test_split(splits, name, test_split)


def _load_from_disk(path: Path):
    load_from_disk = require("datasets", f"reading the saved dataset {path}").load_from_disk
    if not any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        raise ConfigError(f"dataset_name {path} is a directory but not a dataset saved with save_to_disk (it has no "
                          "dataset_dict.json or state.json); give the saved directory or a data file")  # fmt: skip
    return load_from_disk(str(path))


def _load_from_hub(name: str, config: str | None):
    load_dataset = require("datasets", f"loading the Hub dataset {name}").load_dataset
    try:
        return load_dataset(name, config)
    except Exception as error:  # network, unknown name or config, a broken cache: datasets raises many kinds
        cause = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        which = name if config is None else f"{name} (config {config})"
        raise ConfigError(f"dataset_name {which} could not be loaded from the Hugging Face Hub or its cache "
                          f"({cause}); check the name and dataset_config, or load it once with network access "
                          "(then HF_HUB_OFFLINE=1 reads the cache)") from error  # fmt: skip


def _split(splits, name: str, split: str, key: str):
    if split not in splits:
        raise ConfigError(f"{key} {split!r}: dataset {name} has the splits {', '.join(splits)}")
    return splits[split]


def _test_split(splits, name: str, split: str | None):
    if split is None:
        return splits["test"] if "test" in splits else None
    return _split(splits, name, split, "dataset_test_split")


def prepare_prompts(dataset, name: str, *, prompt_column: str = "prompt", answer_column: str = "answer",
                    system_prompt: str | None = None, apply_chat_template: bool = False,
                    chat_template: bool = True):  # fmt: skip
    """``dataset`` as the trainer reads it: ``prompt_column`` renamed to ``prompt`` (a ``question`` column is
    taken, with a message, when there is no ``prompt``), ``answer_column`` to ``answer``; with
    ``apply_chat_template`` plain prompts become one user message; ``system_prompt`` is prepended to
    chat prompts as a system message. ``chat_template``: whether the tokenizer has one (chat prompts need it).

    Raises:
        ConfigError (one line, naming ``name`` and the column): a missing column, a system prompt for plain
        prompts, chat prompts and no chat template, a row that already has a system message.
    """
    if len(dataset) == 0:
        raise ConfigError(f"{name} has no rows")
    dataset = _rename(dataset, name, _prompt_source(dataset, name, prompt_column), "prompt")
    if answer_column != "answer" or "answer" in dataset.column_names:
        dataset = _rename(dataset, name, answer_column, "answer")
    chat = not isinstance(dataset[0]["prompt"], str)
    if (chat or apply_chat_template) and not chat_template:
        what = "holds chat messages" if chat else "is to go through the chat template (apply_chat_template: true)"
        raise ConfigError(f"{name}: column {prompt_column!r} {what}, but the tokenizer has no chat template; use a "
                          "model whose tokenizer has one (grpo-fast tiny-model DIR --chat-template qwen makes a "
                          "tiny one), or plain-text prompts and apply_chat_template: false")  # fmt: skip
    if system_prompt is not None and not (chat or apply_chat_template):
        raise ConfigError(f"{name}: system_prompt needs chat prompts, and column {prompt_column!r} holds plain text; "
                          "set apply_chat_template: true (with a tokenizer that has a chat template) or leave it "
                          "out")  # fmt: skip
    if chat or apply_chat_template:  # in memory: no cache file is written next to a saved dataset
        dataset = dataset.map(lambda row, i: {"prompt": _messages(row["prompt"], system_prompt, f"{name} row {i}")},
                              with_indices=True, keep_in_memory=True)  # fmt: skip
    return dataset


def _prompt_source(dataset, name: str, column: str) -> str:
    columns = dataset.column_names
    if column in columns:
        return column
    if column == "prompt" and "question" in columns:
        logger.warning("%s has no 'prompt' column: its 'question' column is the prompt (set prompt_column to "
                       "say so, or to name another)", name)  # fmt: skip
        return "question"
    raise ConfigError(f"{name} has no {column!r} column (prompt_column; its columns: {', '.join(columns)})")


def _rename(dataset, name: str, column: str, to: str):
    if column == to:
        return dataset
    if column not in dataset.column_names:
        which = "answer_column" if to == "answer" else "prompt_column"
        raise ConfigError(f"{name} has no {column!r} column ({which}; its columns: {', '.join(dataset.column_names)})")
    if to in dataset.column_names:
        raise ConfigError(f"{name} has both a {column!r} and a {to!r} column; remove or rename its {to!r} column "
                          f"to use {column!r} as the {to}")  # fmt: skip
    return dataset.rename_column(column, to)


def _messages(prompt, system_prompt: str | None, where: str) -> list[dict]:
    """A prompt as chat messages: text as one user message; ``system_prompt`` first, as a system message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is None:
        return messages
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        raise ConfigError(f"{where} already starts with a system message; leave system_prompt out or remove it")
    return [{"role": "system", "content": system_prompt}, *messages]
