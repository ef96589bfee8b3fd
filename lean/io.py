"""Atomic file writes: a failed or interrupted write never leaves a half file and never
destroys the previous good one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
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


def read_regular(path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, or a one-line error.

    Data folders come from users: a FIFO would block a read forever and a link to /dev/zero
    would never end, so anything but a regular file is refused before reading, and the size is
    checked against the budget before a byte is allocated."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    except FileNotFoundError:
        raise LeanError(f"{path}: no such file; check the path") from None
    except OSError as e:
        raise LeanError(f"{path}: cannot read it ({e.strerror}); check its permissions") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise LeanError(f"{path}: not a regular file ({_kind(st.st_mode)}); replace it with the {what} itself")
        if st.st_size > limit:
            raise LeanError(f"{path}: {st.st_size} bytes is more than a {what} may be ({limit}); check the file")
        return f.read(limit + 1)[:limit]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


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
