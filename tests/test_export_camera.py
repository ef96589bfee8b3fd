"""The command line as a user types it: one-line errors, exit codes, nothing lost."""

import pytest

from lean.errors import LeanError
from lean.export import BACKBONE_FILE, VTRANSFORM_FILE, ExportOptions, export_camera

from helpers import ROOT, SMALL, default_sigint, python


def cli(*args, cwd=ROOT):
    return python(ROOT / "export_camera.py", *args, cwd=cwd)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(cli("--ckpt", tmp_path / "nope.pth", "--out", tmp_path / "o"), "does not exist")


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("hello")
    assert_one_line_error(cli("--ckpt", bad, "--out", tmp_path / "o"), "bad.pth")


def test_float_checkpoint_without_fp16_asks_for_ptq(tmp_path, small_float_ckpt):
    ptq = small_float_ckpt.with_name(f"{small_float_ckpt.stem}_ptq.pth")
    assert_one_line_error(cli("--ckpt", small_float_ckpt, "--out", tmp_path / "o"), "lean.ptq", "--fp16",
                          f"--out {ptq}", f"python export_camera.py --ckpt {ptq}")


def test_io_with_tensorrt8_says_it_is_ignored(tmp_path):
    r = cli("--ckpt", tmp_path / "nope.pth", "--out", tmp_path / "o", "--tensorrt", "8", "--io", "fp32")
    assert "warning: --io fp32 is for typed graphs and is ignored" in r.stderr and r.returncode == 2


def test_keep_fp32_flags_are_checked(tmp_path, small_ptq_ckpt, example_dir):
    common = ("--ckpt", small_ptq_ckpt, "--cameras", "2", "--data", example_dir, "--out", tmp_path / "o")
    assert_one_line_error(cli(*common, "--keep-fp32", "backbone.layer9.*"), "--keep-fp32 backbone.layer9.*",
                          "matches no module")
    assert_one_line_error(cli(*common, "--keep-fp32", "neck.*", "--no-fp32-islands"), "contradict")


def test_verbose_shows_the_traceback(tmp_path):
    r = cli("--ckpt", tmp_path / "nope.pth", "--verbose")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_bad_image_size_fails_before_any_work(tmp_path, small_ptq_ckpt):
    assert_one_line_error(cli("--ckpt", small_ptq_ckpt, "--image-size", "250x700"), "multiples of 8")
    assert_one_line_error(cli("--ckpt", small_ptq_ckpt, "--image-size", "big"), "HxW")


def test_opset_must_fit_the_target(tmp_path, small_ptq_ckpt):
    assert_one_line_error(cli("--ckpt", small_ptq_ckpt, "--opset", "13"), "--tensorrt 10", "19")
    assert_one_line_error(cli("--ckpt", small_ptq_ckpt, "--opset", "11", "--tensorrt", "8"), "13 to 17")


@pytest.fixture(scope="module")
def good_out(tmp_path_factory, small_ptq_ckpt, example_dir):
    out = tmp_path_factory.mktemp("good")
    export_camera(ExportOptions(ckpt=small_ptq_ckpt, out_dir=out, data=example_dir, cameras=SMALL.cameras,
                                check_bev=False))
    return out


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_export_leaves_earlier_outputs_untouched(tmp_path, good_out, example_dir):
    before = snapshot(good_out)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02garbage")
    with pytest.raises(LeanError):
        export_camera(ExportOptions(ckpt=broken, out_dir=good_out, data=example_dir, cameras=2))
    assert snapshot(good_out) == before


def test_failure_after_tracing_leaves_no_temp_files(tmp_path, good_out, small_ptq_ckpt, example_dir, monkeypatch):
    before = snapshot(good_out)
    import lean.export

    def fail(*a, **k):
        raise LeanError("simulated validation failure")

    monkeypatch.setattr(lean.export, "validate", fail)
    with pytest.raises(LeanError):
        export_camera(ExportOptions(ckpt=small_ptq_ckpt, out_dir=good_out, data=example_dir, cameras=2,
                                    check_bev=False))
    assert snapshot(good_out) == before  # no half file, no .tmp left behind


def test_unwritable_out_is_a_one_line_error(tmp_path, small_ptq_ckpt, example_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("--ckpt", small_ptq_ckpt, "--out", blocker / "sub", "--data", example_dir, "--cameras", "2",
            "--no-check-bev")
    assert_one_line_error(r, "cannot write")


def test_summary_table_is_printed(tmp_path, small_ptq_ckpt, example_dir):
    r = cli("--ckpt", small_ptq_ckpt, "--out", tmp_path / "o", "--data", example_dir, "--cameras", "2", "--fp16",
            "--plot")
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert header[:3] == ["file", "size", "nodes"] and "max" in header
    assert BACKBONE_FILE in r.stdout and VTRANSFORM_FILE in r.stdout and "BEV map" in r.stdout
    assert "lean-ptq format, resnet50+generalized_lss_fpn+depth_lss" in r.stdout  # what was detected
    for png in ("bev_pytorch.png", "bev_onnx.png", "bev_diff.png"):
        assert (tmp_path / "o" / png).stat().st_size > 1000


def _start(*args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ROOT / "export_camera.py"), *map(str, args)], cwd=ROOT, env=env,
                            preexec_fn=default_sigint,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, path, what):
    """Until ``proc``'s stderr shows the stage ``what`` (the staging folder exists by then)."""
    for line in proc.stderr:
        if what in line:
            return
    raise AssertionError(f"{what} never started")


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_export_leaves_the_earlier_set_and_no_temp(tmp_path, small_ptq_ckpt, example_dir, sig):
    import signal

    out = tmp_path / "onnx"
    export_camera(ExportOptions(ckpt=small_ptq_ckpt, out_dir=out, data=example_dir, cameras=2, check_bev=False))
    before = _files(out)
    proc = _start("--ckpt", small_ptq_ckpt, "--out", out, "--data", example_dir, "--cameras", "2", "--fp16")
    _wait_for(proc, out, "exporting camera.vtransform.onnx")  # the backbone file is written by then
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "error: interrupted" in err and "Traceback" not in err
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path, small_ptq_ckpt, example_dir):
    out = tmp_path / "onnx"
    proc = _start("--ckpt", small_ptq_ckpt, "--out", out, "--data", example_dir, "--cameras", "2", "--fp16")
    _wait_for(proc, out, "exporting camera.vtransform.onnx")
    proc.kill()
    proc.communicate(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    # The dead writer's staging folder, and its lock file (a dead process holds no lock on it).
    assert not out.exists() and len(left) == 2 and left[0].startswith(".onnx.lean-") and left[1] == ".onnx.lean-lock"
    r = cli("--ckpt", small_ptq_ckpt, "--out", out, "--data", example_dir, "--cameras", "2", "--fp16",
            "--no-check-bev")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_two_exports_into_one_folder_one_waits_out(tmp_path, small_ptq_ckpt, example_dir):
    out = tmp_path / "onnx"
    first = _start("--ckpt", small_ptq_ckpt, "--out", out, "--data", example_dir, "--cameras", "2", "--fp16")
    _wait_for(first, out, "reading checkpoint")
    second = cli("--ckpt", small_ptq_ckpt, "--out", out, "--data", example_dir, "--cameras", "2", "--fp16")
    assert_one_line_error(second, "another run is writing")
    first.communicate(timeout=300)
    assert first.returncode == 0 and (out / BACKBONE_FILE).exists()


def test_two_exports_and_two_ptq_runs_are_byte_identical(tmp_path, small_float_ckpt, example_dir):
    from lean.quantize import PTQOptions, run_ptq

    for name in ("a", "b"):
        run_ptq(PTQOptions(ckpt=small_float_ckpt, out=tmp_path / f"{name}.pth", data=example_dir, method="max",
                           progress=False, cameras=2))  # the range record too
        export_camera(ExportOptions(ckpt=tmp_path / f"{name}.pth", out_dir=tmp_path / name, data=example_dir,
                                    cameras=2, check_bev=False))
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()
    for f in (BACKBONE_FILE, VTRANSFORM_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
