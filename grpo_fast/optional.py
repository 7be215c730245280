"""Optional packages imported where they are needed, so that their absence is one line naming the package."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingPackage(ImportError):
    """An optional package that something asked for does not import here; ``package`` names it."""

    def __init__(self, package: str, needed_for: str, install: str | None = None):
        super().__init__(f"{needed_for} needs the {package} package: pip install {install or package}", name=package)
        self.package = package


def require(package: str, needed_for: str, install: str | None = None) -> ModuleType:
    """``import package``, or a MissingPackage (an ImportError) saying what needs it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise MissingPackage(package, needed_for, install) from err
