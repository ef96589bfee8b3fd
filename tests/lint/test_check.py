"""The lint on our own exports, and on a graph built like CUDA-BEVFusion's INT8 export."""

import pytest

from lean.errors import LeanError
from lean.export import BACKBONE_FILE, VTRANSFORM_FILE
from lean.lint.check import lint_file

from helpers import one_line


@pytest.mark.parametrize("export,target", [("small_int8_export", "10"), ("small_int8_export", "11"),
                                           ("small_classic_export", "8")])
def test_our_exports_pass(request, export, target):
    report, out = request.getfixturevalue(export)
    backbone = lint_file(out / BACKBONE_FILE, target)
    assert not backbone.errors, [f.to_json() for f in backbone.errors]
    assert set(backbone.macs) == {"INT8"} and backbone.macs["INT8"] > 1e9
    vtransform = lint_file(out / VTRANSFORM_FILE, target)
    assert not vtransform.errors and set(vtransform.macs) == {"FP32" if target == "8" else "FP16"}
    assert report.graphs[0].lint["verdict"] in ("ok", "warning") and report.graphs[0].lint["macs"] == backbone.macs


def test_cuda_bevfusion_style_int8_is_ready_for_8_not_for_11(small_classic_export, tmp_path):
    """Opset 13, FP32 tensors, Q/DQ with FP32 scales: what CUDA-BEVFusion's export-camera.py writes
    (our classic file without its metadata: no declared target or bindings)."""
    import onnx

    proto = onnx.load(str(small_classic_export[1] / BACKBONE_FILE))
    del proto.metadata_props[:]
    path = tmp_path / BACKBONE_FILE
    onnx.save(proto, str(path))
    assert not lint_file(path, "8").errors
    result = lint_file(path, "11")
    errors = {f.rule: f for f in result.errors}
    assert set(errors) == {"typing.compute"}  # FP32 everywhere outside the Q/DQ convs, on a typed target
    assert "runs in FP32" in errors["typing.compute"].note
    assert {f.rule for f in result.warnings} == {"typing.io"}  # FP32 bindings (the runtime binds FP16)


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for path, words in ((tmp_path / "junk.onnx", "not a valid ONNX model"), (tmp_path / "none.onnx", "does not exist")):
        with pytest.raises(LeanError) as e:
            lint_file(path, "10")
        assert words in one_line(e)


def test_external_data_is_read_from_beside_the_file(tmp_path, small_classic_export):
    import onnx

    model = onnx.load(str(small_classic_export[1] / BACKBONE_FILE))
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data")
    result = lint_file(tmp_path / "m.onnx", "8")
    assert not result.errors and result.macs["INT8"] > 1e9
