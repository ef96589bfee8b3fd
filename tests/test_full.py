"""Full-size runs (6 cameras, 256x704, ResNet50; MIT camera-only SwinT): one of each main path, as a user runs them."""

import json

import pytest

from lean.export import BACKBONE_FILE, VTRANSFORM_FILE, ExportOptions, export_camera

from helpers import onnx_io, python

pytestmark = pytest.mark.full


def run(*args):
    r = python(*args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, example_dir):
    folder = tmp_path_factory.mktemp("full")
    fl, ptq = folder / "bevfusion-det.pth", folder / "bevfusion_ptq.pth"
    run("-m", "lean.demo", "--out", fl, "--data", example_dir)
    run("-m", "lean.ptq", "--ckpt", fl, "--out", ptq, "--data", example_dir)  # default: mse histogram
    return fl, ptq


def test_int8_main_job(tmp_path, checkpoints, example_dir):
    out = tmp_path / "onnx_int8"
    r = run("export_camera.py", "--ckpt", checkpoints[1], "--out", out, "--data", example_dir)
    assert "camera.backbone.onnx" in r.stdout and "BEV map" in r.stdout
    assert onnx_io(out / BACKBONE_FILE) == {
        "img": [1, 6, 3, 256, 704], "depth": [1, 6, 1, 256, 704],
        "camera_feature": [6, 32, 88, 80], "camera_depth_weights": [6, 118, 32, 88]}
    assert onnx_io(out / VTRANSFORM_FILE) == {"feat_in": [1, 80, 360, 360], "feat_out": [1, 80, 180, 180]}
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"]["meta"]["calibration"]["method"] == "mse"
    assert report["files"][BACKBONE_FILE]["qdq_pairs"] >= 126 and report["bev_check"]["ok"]
    # Strongly typed for TensorRT 10/11, at the targets against the PyTorch INT8 reference.
    assert report["opset"] == 19 and report["target"]["io"] == "fp16" and "--stronglyTyped" in r.stdout
    assert all(o["cosine"] >= 0.98 for o in report["files"][BACKBONE_FILE]["outputs"].values())
    assert report["bev_check"]["cosine"] >= 0.99


def test_fp16_main_job(tmp_path, checkpoints, example_dir):
    report = export_camera(ExportOptions(ckpt=checkpoints[1], out_dir=tmp_path, data=example_dir, fp16=True))
    assert report.facts["target"]["typing"] == "strongly typed"
    for g in report.graphs:
        assert all(o["cosine"] >= 0.9995 for o in g.outputs.values())
    assert report.facts["bev_check"]["cosine"] >= 0.999


def test_tensorrt8_int8_job(tmp_path, checkpoints, example_dir):
    out = tmp_path / "onnx_int8"
    r = run("export_camera.py", "--ckpt", checkpoints[1], "--out", out, "--data", example_dir, "--tensorrt", "8")
    assert "--fp16 --int8 --inputIOFormats=fp16:chw,fp16:chw" in r.stdout
    vtransform = next(line for line in r.stdout.splitlines() if "trtexec --onnx=" in line and VTRANSFORM_FILE in line)
    assert "--int8" not in vtransform and "--fp16 --inputIOFormats=fp16:chw " in vtransform
    report = json.loads((out / "report.json").read_text())
    assert report["opset"] == 13 and report["target"]["io"] == "fp32" and report["bev_check"]["ok"]
    assert report["files"][BACKBONE_FILE]["qdq_pairs"] >= 126


def test_five_cameras_full_size(tmp_path, checkpoints, example_dir):
    export_camera(ExportOptions(ckpt=checkpoints[0], out_dir=tmp_path, data=example_dir, fp16=True, cameras=5,
                                check_bev=False))
    assert onnx_io(tmp_path / BACKBONE_FILE)["camera_depth_weights"] == [5, 118, 32, 88]


def test_384x1056_full_size(tmp_path, checkpoints, example_dir):
    export_camera(ExportOptions(ckpt=checkpoints[0], out_dir=tmp_path, data=example_dir, fp16=True,
                                image_size=(384, 1056), rebuild_frustum=True, check_bev=False))
    s = onnx_io(tmp_path / BACKBONE_FILE)
    assert s["img"] == [1, 6, 3, 384, 1056] and s["camera_feature"] == [6, 48, 132, 80]


def test_mit_camera_only_full_size(tmp_path, example_dir):
    """MIT's camera-only-det layout at its own size (SwinT, LSSTransform, 256x256 BEV grid), built
    and saved by tests/trainers.py: the CLI detects it, exports `img` only, and the typed FP16 graph
    computes what the trainer's modules compute."""
    import numpy as np
    import torch

    from lean.config import CameraConfig
    from lean.data import load_inputs
    from lean.validate import feeds, ort_session

    from trainers import make_trainer_camera, save_mit

    _, img, _ = load_inputs(example_dir, CameraConfig(vtransform="lss"))
    theirs = make_trainer_camera(img, None, backbone="swint", vtransform="lss", image_size=(256, 704),
                                 xbound=(-51.2, 51.2, 0.4))
    save_mit(theirs, tmp_path / "camera-only-det.pth")
    out = tmp_path / "onnx"
    r = run("export_camera.py", "--ckpt", tmp_path / "camera-only-det.pth", "--fp16", "--out", out, "--data", example_dir)
    assert "mit format, swint+generalized_lss_fpn+lss" in r.stdout
    assert onnx_io(out / BACKBONE_FILE) == {"img": [1, 6, 3, 256, 704], "camera_feature": [6, 32, 88, 80],
                                            "camera_depth_weights": [6, 118, 32, 88]}
    assert onnx_io(out / VTRANSFORM_FILE) == {"feat_in": [1, 80, 256, 256], "feat_out": [1, 80, 128, 128]}
    session = ort_session(out / BACKBONE_FILE)
    feature, weights = session.run(None, feeds(session, {"img": img}))
    with torch.no_grad():
        their_weights, their_feature = theirs(img)
    for a, b in ((feature.transpose(0, 3, 1, 2), their_feature), (weights, their_weights)):
        a, b = np.asarray(a, np.float64).ravel(), b.double().numpy().ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.999
