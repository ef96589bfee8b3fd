import os

import pytest

from lean.errors import LeanError
from lean.io import atomic_path, ensure_writable, sha256, write_text

from helpers import one_line


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(os.listdir(target.parent)) == ["f.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(os.listdir(target.parent)) == ["f.txt"]


def test_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LeanError) as e:
        ensure_writable(blocker / "sub")
    assert "cannot write" in one_line(e)
    ensure_writable(tmp_path / "fine")
    assert os.listdir(tmp_path / "fine") == []  # the probe leaves nothing


def test_sha256(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    assert sha256(tmp_path / "a") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
