"""Atomic writes: a failed or interrupted write never leaves a half file or a mixed set of
files, and never destroys the previous good output; bounded reads of user files."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
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
        st = os.stat(path)  # before opening: opening a device can have effects of its own
    except FileNotFoundError:
        raise LeanError(f"{path}: no such file; check the path") from None
    except OSError as e:
        raise LeanError(f"{path}: cannot read it ({e.strerror}); check its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise LeanError(f"{path}: not a regular file ({_kind(st.st_mode)}); replace it with the {what} itself")
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


# -- the export's output folder: all or nothing ---------------------------------------------------
# Staging folders and temp files carry the writer's pid, so a later run can tell a dead writer's
# leftovers (SIGKILL, power loss) from a live one's.
_STAGING = re.compile(r"\.(?P<name>.+)\.lean-(?P<pid>\d{1,9})-[0-9a-f]{8}(?P<old>\.old)?")
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d{1,9})\.[0-9a-f]{8}\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove what dead writers left in ``parent`` (for the output ``name`` only, when given): temp
    files, staging folders; a folder that a writer had moved aside (``.old``) while swapping is
    put back if its place is empty. A writer is judged by its pid, so leftovers of a writer in
    another pid namespace (a container sharing the folder) may look dead."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        staging, temp = _STAGING.fullmatch(entry.name), _TEMP.fullmatch(entry.name)
        match = staging or temp
        if not match or _alive(int(match["pid"])) or (name and match["name"] != name):
            continue
        if staging and staging["old"] and not (entry.parent / staging["name"]).exists():
            os.replace(entry, entry.parent / staging["name"])  # the swap died halfway: the old set comes back
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def _writer_lock(out_dir: Path):
    """One writer per output folder: a second one fails at once with a one-line error."""
    path = out_dir.parent / f".{out_dir.name}.lean-lock"
    while True:
        try:  # read-only is enough for flock, and another user's lock file stays usable (0666 less umask)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise LeanError(f"cannot lock {out_dir} for writing ({e.strerror}): remove {path} or choose "
                            "another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LeanError(f"another run is writing {out_dir} right now: wait for it to finish or choose "
                            "another --out") from None
        except OSError as e:
            os.close(fd)
            raise LeanError(f"cannot lock {out_dir} for writing ({e.strerror}): choose an --out on a local "
                            "file system") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # still the lock file everyone opens (its last holder unlinks it when done)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


@contextlib.contextmanager
def output_folder(out_dir, ours: tuple[str, ...]):
    """Yield a fresh staging folder beside ``out_dir``; when the block succeeds it becomes
    ``out_dir`` in one step, with every file of the old folder that is not one of ``ours``
    carried over (hard links). A failure, Ctrl-C or SIGTERM leaves ``out_dir`` exactly as it was;
    a SIGKILL leaves a staging folder that the next run removes."""
    # The real folder: a symlinked --out is written through (the link stays), and the lock and
    # the staging folder sit beside the folder that changes.
    out_dir = Path(os.path.realpath(out_dir))
    cwd = Path.cwd().resolve()
    if out_dir == Path(out_dir.anchor) or out_dir == cwd or out_dir in cwd.parents:
        raise LeanError(f"--out {out_dir} is the current folder or one above it; the export replaces --out as a "
                        "whole: choose a folder of its own, e.g. qat/onnx_int8")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LeanError(f"cannot write {out_dir}: {e.strerror}; choose a writable folder") from None
    if out_dir.exists() and not out_dir.is_dir():
        raise LeanError(f"{out_dir} exists and is not a folder: choose another --out")
    with _writer_lock(out_dir):
        clean_stale(out_dir.parent, out_dir.name)
        staging = out_dir.parent / f".{out_dir.name}.lean-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            if out_dir.is_dir():
                shutil.copystat(out_dir, staging)  # a shared folder keeps its mode
        except OSError as e:
            raise LeanError(f"cannot write {out_dir}: {e.strerror}; choose a writable folder") from None
        try:
            yield staging
            try:
                staging = _swap_in(staging, out_dir, ours)
            except OSError as e:
                raise LeanError(f"cannot write {out_dir}: {e.strerror or e}; free space or choose another --out") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, out_dir: Path, ours: tuple[str, ...]) -> Path:
    """Make ``staging`` the new ``out_dir``; returns what is left to remove (the old folder)."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return staging
    for entry in out_dir.iterdir():
        if entry.name not in ours:
            _link(entry, staging / entry.name)
    if _exchange(staging, out_dir):
        return staging
    aside = staging.with_name(staging.name + ".old")
    os.rename(out_dir, aside)  # a crash between these two renames leaves `aside`, which clean_stale puts back
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(aside, out_dir)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return aside


def _link(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
