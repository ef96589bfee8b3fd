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


# -- the output folder: all or nothing --------------------------------------------------------------
from lean import io as lean_io  # noqa: E402
from lean.io import clean_stale, output_folder, read_regular  # noqa: E402

OURS = ("a.onnx", "b.onnx", "report.json")


def _fill(folder, text):
    for name in OURS:
        (folder / name).write_text(text)


def _state(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False])
def test_output_folder_swaps_the_whole_set_and_keeps_other_files(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(lean_io, "_exchange", lambda a, b: False)  # the two-rename fallback
    out = tmp_path / "onnx"
    with output_folder(out, OURS) as staging:
        _fill(staging, "old")
    (out / "engine.plan").write_text("user")
    (out / "plans").mkdir()
    (out / "plans" / "x.plan").write_text("user too")
    with output_folder(out, OURS) as staging:
        (staging / "a.onnx").write_text("new")  # the new set has only one of ours
    assert _state(out) == {"a.onnx": "new", "engine.plan": "user"} and (out / "plans" / "x.plan").read_text() == "user too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_output_folder_failure_leaves_everything_as_it_was(tmp_path):
    out = tmp_path / "onnx"
    with output_folder(out, OURS) as staging:
        _fill(staging, "old")
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with output_folder(out, OURS) as staging:
                _fill(staging, "half")
                raise error("interrupted")
        assert _state(out) == dict.fromkeys(OURS, "old") and sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_one_writer_per_folder(tmp_path):
    out = tmp_path / "onnx"
    with output_folder(out, OURS):
        with pytest.raises(LeanError) as e:
            with output_folder(out, OURS):
                pass
        assert "another run is writing" in one_line(e)
    with output_folder(out, OURS):  # released
        pass


def test_leftovers_of_dead_writers_are_removed_and_a_half_swap_is_undone(tmp_path):
    dead = 2**22 + 12345  # above Linux's default pid_max
    (tmp_path / f".onnx.lean-{dead}-0123abcd").mkdir()
    (tmp_path / f".ptq.pth.{dead}.deadbeef.tmp").write_bytes(b"x" * 100)
    (tmp_path / f".onnx.lean-{os.getpid()}-0123abcd").mkdir()  # a live writer's: kept
    (tmp_path / "notes.txt").write_text("mine")
    removed = clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".onnx.lean-{dead}-0123abcd", f".ptq.pth.{dead}.deadbeef.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".onnx.lean-{os.getpid()}-0123abcd", "notes.txt"])
    aside = tmp_path / f".other.lean-{dead}-0123abcd.old"  # killed between the two renames
    aside.mkdir()
    (aside / "a.onnx").write_text("old")
    clean_stale(tmp_path)
    assert (tmp_path / "other" / "a.onnx").read_text() == "old" and not aside.exists()


def test_read_regular_refuses_what_would_block_or_never_end(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "big").write_bytes(b"x" * 100)
    for name, words in (("fifo", "a FIFO"), ("zero", "a character device"), ("big", "more than"), ("none", "no such")):
        with pytest.raises(LeanError) as e:
            read_regular(tmp_path / name, 10, "test file")
        assert words in one_line(e)
    assert read_regular(tmp_path / "big", 100, "test file") == b"x" * 100


def test_a_symlinked_out_is_written_through_and_the_current_folder_is_refused(tmp_path, monkeypatch):
    real = tmp_path / "real"
    with output_folder(real, OURS) as staging:
        _fill(staging, "old")
    (tmp_path / "link").symlink_to(real)
    with output_folder(tmp_path / "link", OURS) as staging:
        _fill(staging, "new")
    assert (tmp_path / "link").is_symlink() and _state(real) == dict.fromkeys(OURS, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    monkeypatch.chdir(real)
    for out in (".", "..", "/"):
        with pytest.raises(LeanError) as e:
            with output_folder(out, OURS):
                pass
        assert "current folder or one above it" in one_line(e) or "/" == out
