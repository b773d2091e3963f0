"""Atomic file writes: a reader never sees a partly written output.

Each writer fills a temporary file in the destination folder and renames it
onto the destination (``os.replace`` is atomic on POSIX and Windows).  If
anything fails, the temporary file is removed and the destination is left as
it was.

A run killed outright (SIGKILL, power loss) cannot remove its temporary file.
Temporary names therefore carry the writer's process id,
``.tmp-<pid>-<random>-<name>``, and every write to ``<name>`` first sweeps the
temporary files of ``<name>`` whose process no longer exists: stale files are
gone after the next successful write to the same place.

:func:`atomic_write_many` and :func:`atomic_folder` extend this to a
command's several outputs, which appear together or not at all.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_savez",
           "atomic_write_many", "atomic_folder", "sweep_stale", "json_float", "jsonable"]

_PREFIX = ".tmp-"
# A temporary file without a readable process id (older refflow) is stale after this long.
_STALE_SECONDS = 3600.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or unknowable): keep its file
    return True


def sweep_stale(path) -> list[str]:
    """Remove the temporary files (or folders) of ``path`` left by killed writers.

    Returns the names removed.  Files of writers still running are kept.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    suffix = "-" + os.path.basename(os.path.normpath(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if not (name.startswith(_PREFIX) and name.endswith(suffix)):
            continue
        full = os.path.join(folder, name)
        pid_text = name[len(_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit():
            stale = not _alive(int(pid_text))
        else:
            try:
                stale = time.time() - os.lstat(full).st_mtime > _STALE_SECONDS
            except OSError:
                continue
        if not stale:
            continue
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
            removed.append(name)
        except OSError:
            pass  # removed meanwhile, or not ours to remove
    return removed


def _temporary(path: str, folder: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{_PREFIX}{os.getpid()}-", suffix="-" + os.path.basename(path))
    os.close(fd)
    return tmp


def _prepare(path) -> tuple[str, str]:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    sweep_stale(path)
    return path, _temporary(path, folder)


def _fill(tmp: str, write) -> None:
    with open(tmp, "wb") as fh:
        write(fh)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's files are private


def atomic_write(path, write) -> None:
    """Call ``write(fh)`` on a binary temporary file, then rename it onto ``path``.

    The folder is created if missing.  The file gets the permissions of an
    ordinary new file (mkstemp's are private).
    """
    atomic_write_many({path: write})


def atomic_write_many(writers: dict) -> None:
    """Write several files so that they appear together or not at all.

    ``writers`` maps each path to a ``write(fh)`` function.  Every file is
    first written in full to its temporary name; only when all succeeded are
    they renamed into place.  A failure while writing leaves every
    destination as it was.
    """
    temps = []
    try:
        for path, write in writers.items():
            path, tmp = _prepare(path)
            temps.append((tmp, path))
            _fill(tmp, write)
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
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


@contextlib.contextmanager
def atomic_folder(path):
    """Fill a folder under a temporary name, then put it in place of ``path``.

    ``with atomic_folder("report") as tmp:`` yields the temporary folder;
    when the block ends without an error, ``report`` (if it exists) is moved
    aside and the new folder renamed onto it, then the old one removed.  On
    an error the temporary folder is removed and ``report`` is left as it was.
    """
    path = os.path.normpath(os.fspath(path))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    sweep_stale(path)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{_PREFIX}{os.getpid()}-", suffix="-" + os.path.basename(path))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.isdir(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f"{_PREFIX}{os.getpid()}-",
                                   suffix="-" + os.path.basename(path))
            os.rmdir(old)
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_float(value):
    """A float for JSON: finite values as they are, inf and NaN as the strings ``"inf"``, ``"nan"``."""
    value = float(value)
    return value if np.isfinite(value) else str(value)


def jsonable(obj):
    """``obj`` with NumPy scalars and arrays made plain Python, for ``json.dumps`` (non-finite floats as strings)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return json_float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
