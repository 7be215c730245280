"""A list of dicts read the way the trainer reads a ``datasets.Dataset``, for when that package is absent."""

from __future__ import annotations


class Rows:
    """Columns of a list of dicts (the first row's keys; a missing value is None, as ``Dataset.from_list``):
    ``rows["col"]`` is a column, ``rows[i]`` a row, ``rows[[i, j]]`` and ``rows[a:b]`` dicts of columns."""

    def __init__(self, rows: list[dict]):
        self.column_names = list(rows[0]) if rows else []
        self._rows = [{name: row.get(name) for name in self.column_names} for row in rows]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self._rows]
        if isinstance(key, int):
            return self._rows[key]
        picked = self._rows[key] if isinstance(key, slice) else [self._rows[i] for i in key]
        return {name: [row[name] for row in picked] for name in self.column_names}
