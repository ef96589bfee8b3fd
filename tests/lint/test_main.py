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


def test_missing_file_is_one_line(tmp_path):
    r = python("-m", "lean.lint", tmp_path / "x.onnx")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
