"""Atomic writes and one-line user errors, shared by loaders and engine.

Every file the project writes (dataset manifests, decoded caches, .beton files, checkpoints,
metrics) goes through `atomic_write`: a temp file in the same folder, fsync, then rename, so
a kill or a full disk leaves the previous version intact.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


class ConfigError(ValueError):
    """Bad user input. The message is one line: what is wrong, where, and how to fix it.
    The CLIs print it without a traceback and exit with code 2."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success it is renamed over `path`.

    On any failure (including a full disk) the temp file is removed and `path` keeps its
    previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
