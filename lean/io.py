"""Atomic file writes: a failed or interrupted write never leaves a half file and never
destroys the previous good one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from lean.errors import LeanError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The folder is created if missing. The temp file is created with mode "x" rather than
    mkstemp, whose 0600 mode would survive the rename; "x" honours the umask.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        open(tmp, "xb").close()
    except OSError as e:
        raise LeanError(f"cannot write {path}: {e.strerror}; choose a writable folder") from None
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_writable(folder) -> None:
    """Fail before long work, not after it, when ``folder`` cannot take our files."""
    with atomic_path(Path(folder) / ".lean-write-probe"):
        pass
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(folder) / ".lean-write-probe")


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
