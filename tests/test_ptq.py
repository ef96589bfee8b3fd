"""``python -m lean.ptq`` as a user runs it."""

from helpers import python


def ptq(*args):
    return python("-m", "lean.ptq", *args)


def test_calibrates_and_writes(tmp_path, small_float_ckpt, example_dir):
    out = tmp_path / "ptq.pth"
    r = ptq("--ckpt", small_float_ckpt, "--out", out, "--data", example_dir, "--method", "max", "--cameras", "2")
    assert r.returncode == 0, r.stderr
    assert "calibrating (max)" in r.stderr and f"wrote {out}" in r.stderr and out.stat().st_size > 0
    assert r.stdout == ""


def test_missing_checkpoint_is_one_line(tmp_path, example_dir):
    r = ptq("--ckpt", tmp_path / "nope.pth", "--out", tmp_path / "o.pth", "--data", example_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: checkpoint {tmp_path / 'nope.pth'} does not exist: check the path, or run `make model` for the demo ones"]
