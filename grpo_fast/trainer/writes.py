"""Failed writes as one error: the file, the cause in plain words ("disk full") and a remedy.

Every file the trainer writes (checkpoint files, metrics.jsonl, the run's config, plots) goes through
``reported`` or ``write_error``; the result is an ``OSError`` with the original errno (so
``PermissionError`` stays a ``PermissionError``). safetensors reports I/O failures as a
``SafetensorError`` whose message holds ``os error N``: that is mapped back to errno N.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

from safetensors import SafetensorError

CAUSES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit reached",
    errno.EROFS: "read-only file system",
}
_NO_SPACE = "free disk space or write elsewhere ({where})"
_NOT_WRITABLE = "make {dir} writable for this user or write elsewhere ({where})"
HINTS = {
    errno.ENOSPC: _NO_SPACE,
    errno.EDQUOT: _NO_SPACE,
    errno.EFBIG: _NO_SPACE,
    errno.EACCES: _NOT_WRITABLE,
    errno.EPERM: _NOT_WRITABLE,
    errno.EROFS: _NOT_WRITABLE,
}


def as_os_error(error: BaseException) -> OSError:
    """``error`` as an OSError: itself, or the I/O error a SafetensorError wraps (EIO when it names none)."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"os error (\d+)", str(error))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, f"{os.strerror(code)} ({error})" if not found else os.strerror(code))


def detail(error: OSError) -> str:
    """The system's words, the file it names, the plain cause: ``No space left on device: FILE (disk full)``."""
    text = error.strerror or str(error)
    if error.filename is not None:
        text += f": {error.filename}"
    return text + (f" ({CAUSES[error.errno]})" if error.errno in CAUSES else "")


def hint(error: OSError, directory: Path, where: str) -> str:
    """The remedy for ``error`` ("" when there is no general one)."""
    return HINTS.get(error.errno, "").format(dir=directory, where=where)


def write_error(error: BaseException, file: Path, where: str = "output_dir") -> OSError:
    """The OSError of a failed write of ``file``: same errno, a message naming the file, cause and remedy."""
    error = as_os_error(error)
    if error.filename is not None and str(error.filename) == str(file):  # named once, in front
        error = OSError(error.errno, error.strerror)
    remedy = hint(error, Path(file).parent, where)
    message = f"could not write {file}: {detail(error)}" + (f"; {remedy}" if remedy else "")
    return OSError(error.errno, message) if error.errno is not None else OSError(message)


@contextlib.contextmanager
def reported(file: Path, where: str = "output_dir"):
    """Re-raise a failed write inside the block as ``write_error`` naming ``file``."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        raise write_error(error, file, where) from error
