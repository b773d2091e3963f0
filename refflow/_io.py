"""Atomic file writes: a reader never sees a partly written output.

Each writer fills a temporary file in the destination folder and renames it
onto the destination (``os.replace`` is atomic on POSIX and Windows).  If
anything fails, the temporary file is removed and the destination is left as
it was.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_savez"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> None:
    """Call ``write(fh)`` on a binary temporary file, then rename it onto ``path``.

    The folder is created if missing.  The file gets the permissions of an
    ordinary new file (mkstemp's are private).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_savez(path, **arrays) -> None:
    """``numpy.savez`` to ``path`` atomically."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays))
