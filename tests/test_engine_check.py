"""The engine check: the Polygraphy files each export writes, the ``polygraphy run`` commands
(run here with ONNX Runtime in place of TensorRT, which no machine here has), and
``python -m lean.check_engine`` on Polygraphy's saved outputs."""

import json
import shlex
import shutil

import numpy as np
import pytest
from polygraphy.comparator import RunResults
from polygraphy.json import load_json, save_json

from lean.criteria import tolerance
from lean.engine_check import CheckOptions, check_engine, check_file_names, criteria, polygraphy_command
from lean.errors import LeanError
from lean.export import BACKBONE_FILE, CHECK_FILES, VTRANSFORM_FILE, ExportOptions, export_camera
from lean.report import summary_table

from helpers import SMALL, polygraphy_onnxrt, python

EXPORTS = ["small_int8_export", "small_classic_export", "small_fp16_export", "small_fp16_classic_export"]


@pytest.mark.parametrize("export", EXPORTS)
def test_polygraphy_passes_our_files_on_our_graphs(request, export):
    report, folder = request.getfixturevalue(export)
    for g in report.graphs:
        inputs, outputs = check_file_names(g.file)
        assert g.engine_check["files"] == [inputs, outputs]
        feed = load_json(str(folder / inputs))
        assert len(feed) == 1 and all(a.dtype == np.float16 for a in feed[0].values())  # what the engine binds
        ref = RunResults.load(str(folder / outputs))
        assert set(ref[0][1][0]) == set(g.outputs)
        r = polygraphy_onnxrt(g, folder)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert "PASSED" in r.stdout + r.stderr


def test_the_summary_and_report_give_the_commands(small_int8_export):
    report, folder = small_int8_export
    text = summary_table(report)
    facts = json.loads((folder / "report.json").read_text())
    for g in report.graphs:
        stem = str(folder / g.file).removesuffix(".onnx")
        cmd = g.engine_check["command"]
        assert cmd in text and g.engine_check["check_command"] in text
        assert cmd.startswith(f"polygraphy run {stem}.plan --model-type engine --trt --load-inputs {stem}.inputs.json "
                              f"--load-outputs {stem}.outputs.json --save-outputs {stem}.engine-outputs.json --validate")
        assert facts["files"][g.file]["engine_check"]["command"] == cmd
        # INT8: the cosine bound and the step bound of the export, per output.
        assert "--compare simple cosine_similarity" in cmd and "--check-error-stat max --rtol 0" in cmd
        ref = RunResults.load(str(folder / check_file_names(g.file)[1]))[0][1][0]
        for out, c in g.engine_check["criteria"].items():  # bounds on the reference outputs the file holds
            assert f"{out}:{c['atol']:.6g}" in cmd or f"{out}:{c['atol'] * (1 + 1e-5):.6g}" in cmd
            assert f"{out}:0.97" in cmd
            assert c["atol"] == pytest.approx(64 * float(np.abs(ref[out].astype(np.float64)).max()) / 127)


def test_a_classic_engine_is_held_to_fp16_bounds(small_fp16_classic_export):
    """The classic graph validated against FP32 bounds; its engine computes in FP16 (--fp16)."""
    report, _ = small_fp16_classic_export
    g = report.graphs[0]
    assert g.engine_check["binding"] == "float16" and "cosine_similarity" in g.engine_check["command"]
    for out, c in g.engine_check["criteria"].items():
        assert c["min_cosine"] == 0.9995 and c["atol"] == pytest.approx(1e-2 * g.outputs[out]["ref_max_abs"], rel=1e-3)


def test_the_criteria_are_the_exports():
    ref = {"a": np.array([1.0, -4.0]), "b": np.zeros(3)}
    c = criteria(tolerance("fp16", True), ref)
    assert c["a"] == {"atol": pytest.approx(0.04), "min_cosine": 0.9995} and c["b"]["atol"] == 1e-6
    cmd = polygraphy_command(__import__("pathlib").Path("/o/x.onnx"), c)
    assert "--atol a:0.04 b:1e-06 --cosine-similarity-threshold a:0.9995 b:0.9995" in cmd


def test_polygraphy_fails_a_changed_reference(small_int8_export, tmp_path):
    report, folder = small_int8_export
    g = report.graphs[0]
    results = RunResults.load(str(folder / check_file_names(g.file)[1]))
    it = results[0][1][0]
    it["camera_feature"] = (it["camera_feature"].astype(np.float32) * 1.5).astype(np.float16)
    changed = tmp_path / "changed.json"
    save_json(results, str(changed))
    r = polygraphy_onnxrt(g, folder, reference=changed)
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


@pytest.fixture(scope="module")
def saved(small_int8_export, tmp_path_factory):
    """Polygraphy's saved ONNX Runtime outputs of the INT8 backbone (as a user saves the engine's)."""
    report, folder = small_int8_export
    g = report.graphs[0]
    r = polygraphy_onnxrt(g, folder)
    assert r.returncode == 0, r.stderr[-2000:]
    args = shlex.split(g.engine_check["onnxrt_command"])
    out = tmp_path_factory.mktemp("saved")
    shutil.copy(args[args.index("--save-outputs") + 1], out / "engine.json")
    return out / "engine.json", folder / check_file_names(g.file)[1]


def test_check_engine_passes_polygraphys_outputs(saved):
    r = python("-m", "lean.check_engine", *saved)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "criteria from" in lines[0] and "report.json (int8)" in lines[0]
    assert sum(line.strip().startswith("ok   camera_") for line in lines) == 2 and "2 of 2 outputs pass" in lines[-1]
    assert "steps of max |ref|/127" in r.stdout


def _edited(saved, tmp_path, edit):
    results = RunResults.load(str(saved[0]))
    for _, iterations in results:
        it = iterations[0]
        it["camera_depth_weights"] = edit(np.array(it["camera_depth_weights"]))
    path = tmp_path / "edited.json"
    save_json(results, str(path))
    return path


def test_check_engine_fails_nan_and_a_scaled_channel(saved, tmp_path):
    def nan(a):
        a.flat[5] = np.nan
        return a

    def scaled(a):
        a[:, 3] *= 4  # one depth bin off by 4x: Polygraphy's max error may still look small next to INT8 noise
        return a

    for edit, why in ((nan, "1 of"), (scaled, "")):
        r = python("-m", "lean.check_engine", _edited(saved, tmp_path, edit), saved[1])
        assert r.returncode == 1, r.stdout + r.stderr
        fail = [line for line in r.stdout.splitlines() if "FAIL camera_depth_weights" in line]
        assert fail and why in fail[0] and "1 of 2 outputs pass" in r.stdout
    verdicts, _ = check_engine(CheckOptions(_edited(saved, tmp_path, scaled), saved[1]))
    bad = next(v for v in verdicts if not v.ok)
    assert np.isfinite(bad.stats["cosine"]) and (bad.stats["cosine"] < 0.97 or bad.stats["max_abs_err"] > bad.stats["tolerance"])


def test_check_engine_user_errors(saved, tmp_path):
    engine, ref = saved
    (tmp_path / "not.json").write_text("{\"a\": 1}")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(ref, lone / "ref.json")
    cases = [((tmp_path / "missing.json", ref), "no such file"),
             ((tmp_path / "not.json", ref), "is not a Polygraphy RunResults JSON"),
             ((engine, lone / "ref.json"), "keep report.json beside it, or pass --precision")]
    for args, words in cases:
        r = python("-m", "lean.check_engine", *args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = python("-m", "lean.check_engine", engine, lone / "ref.json", "--precision", "int8")
    assert r.returncode == 0, r.stderr
    with pytest.raises(LeanError, match="iterations"):
        results = RunResults.load(str(engine))
        results[0][1].append(results[0][1][0])
        save_json(results, str(tmp_path / "two.json"))
        check_engine(CheckOptions(tmp_path / "two.json", ref))


def test_no_engine_check_files_leaves_no_old_ones(small_ptq_ckpt, small_int8_export, example_dir, tmp_path):
    _, folder = small_int8_export
    out = tmp_path / "o"
    shutil.copytree(folder, out)
    assert all((out / f).exists() for f in CHECK_FILES)
    report = export_camera(ExportOptions(ckpt=small_ptq_ckpt, out_dir=out, data=example_dir, cameras=SMALL.cameras,
                                         check_bev=False, engine_check_files=False))
    assert not any((out / f).exists() for f in CHECK_FILES)  # an older export's files would not fit these graphs
    assert (out / BACKBONE_FILE).exists() and (out / VTRANSFORM_FILE).exists()
    assert all(not g.engine_check for g in report.graphs) and "polygraphy" not in summary_table(report)


def test_a_value_its_fp16_binding_cannot_hold_is_refused(tmp_path):
    """A classic graph computes in FP32; bound as FP16, an output past 65504 would come back inf."""
    from lean.engine_check import write_check_files

    with pytest.raises(LeanError, match="camera_feature holds values beyond float16 .max |x| 1e\\+05"):
        write_check_files(tmp_path, "camera.backbone.onnx", {"img": np.ones(3)},
                          {"camera_feature": np.array([1.0, 1e5])}, np.float16)
    assert write_check_files(tmp_path, "x.onnx", {"img": np.ones(3)}, {"y": np.ones(2)}, np.float16) == \
        ["x.inputs.json", "x.outputs.json"]
