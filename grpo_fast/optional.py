"""Optional packages imported where they are needed, so that their absence is one line naming the package."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(package: str, needed_for: str, install: str | None = None) -> ModuleType:
    """``import package``, or an ImportError saying what needs it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"{needed_for} needs the {package} package: pip install {install or package}") from err
