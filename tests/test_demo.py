"""``python -m lean.demo`` as a user runs it (the demo model itself: tests/test_scene.py)."""

from helpers import python


def demo(*args):
    return python("-m", "lean.demo", *args)


def test_missing_data_is_one_line(tmp_path):
    r = demo("--out", tmp_path / "d.pth", "--data", tmp_path / "nowhere")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no such folder" in errors[0]
    assert "UNTRAINED" in r.stderr and not (tmp_path / "d.pth").exists()


def test_help_lists_the_shared_arguments():
    r = demo("--help")
    assert r.returncode == 0 and all(a in r.stdout for a in ("--out", "--data", "--backbone", "--verbose"))
