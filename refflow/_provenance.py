"""Where a result came from: refflow's version and, in a git checkout, its commit."""
from __future__ import annotations

import functools
import os
import subprocess

__all__ = ["version", "git_commit", "provenance"]


def version() -> str:
    """refflow's version string."""
    from refflow import __version__

    return __version__


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the git checkout refflow is imported from (with ``+dirty`` when
    it has uncommitted changes), or None for an installed copy or without git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "refflow"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return commit + ("+dirty" if dirty else "")


def provenance() -> dict:
    """``{"refflow": version, "commit": commit or None}``."""
    return {"refflow": version(), "commit": git_commit()}
