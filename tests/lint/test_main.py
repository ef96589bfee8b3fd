"""``python -m lean.lint`` as a user runs it."""

import json

from lean.export import BACKBONE_FILE

from helpers import python


def test_table_and_exit_codes(small_classic_export):
    path = small_classic_export[1] / BACKBONE_FILE
    ok = python("-m", "lean.lint", path, "--target", "8")
    assert ok.returncode == 0, ok.stderr
    assert "camera.backbone.onnx: TensorRT 8: 0 errors" in ok.stdout and "% in INT8" in ok.stdout
    bad = python("-m", "lean.lint", path, "--target", "11", "--json")
    assert bad.returncode == 1
    [result] = json.loads(bad.stdout)
    assert result["verdict"] == "error" and {f["rule"] for f in result["findings"] if f["verdict"] == "error"} == {
        "typing.compute"}


def test_the_target_defaults_to_the_one_the_file_declares(small_classic_export, tmp_path, small_ptq_ckpt,
                                                           example_dir):
    """Our --tensorrt 8 file lints clean with no --target; an --io fp32 file's bindings are what it says."""
    from lean.export import ExportOptions, export_camera

    classic = python("-m", "lean.lint", small_classic_export[1] / BACKBONE_FILE)
    assert classic.returncode == 0, classic.stdout
    assert "camera.backbone.onnx: TensorRT 8 (the file's metadata): 0 errors" in classic.stdout
    export_camera(ExportOptions(ckpt=small_ptq_ckpt, out_dir=tmp_path, data=example_dir, cameras=2, io="fp32",
                                check_bev=False))
    r = python("-m", "lean.lint", tmp_path / BACKBONE_FILE, "--json")
    [result] = json.loads(r.stdout)
    io = next(f for f in result["findings"] if f["rule"] == "typing.io")
    assert r.returncode == 0 and io["verdict"] == "ok" and "as the file declares" in io["note"]


def test_missing_file_is_one_line(tmp_path):
    r = python("-m", "lean.lint", tmp_path / "x.onnx")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
