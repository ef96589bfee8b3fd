"""The quantize stage as a library call: data folders, refusals before any work, what is saved."""

import shutil

import pytest

from lean.checkpoint import read_checkpoint
from lean.errors import LeanError
from lean.contract import BACKBONE_FILE, VTRANSFORM_FILE
from lean.quantize import PTQOptions, run_ptq
from lean.ranges import BOUND

from helpers import one_line


def test_refusals_come_before_any_work(tmp_path, small_ptq_ckpt, example_dir):
    with pytest.raises(LeanError) as e:
        run_ptq(PTQOptions(ckpt=tmp_path / "missing.pth", out=tmp_path / "o.pth", data=example_dir, method="minmax"))
    assert "minmax" in one_line(e)
    with pytest.raises(LeanError) as e:
        run_ptq(PTQOptions(ckpt=small_ptq_ckpt, out=tmp_path / "o.pth", data=example_dir, progress=False))
    assert "already quantized" in one_line(e)
    assert not (tmp_path / "o.pth").exists()


def test_ptq_checkpoint_holds_amax_config_and_provenance(small_ptq_ckpt, small_float_ckpt):
    ckpt = read_checkpoint(small_ptq_ckpt)
    assert (ckpt.kind, ckpt.source, ckpt.config.image_size) == ("ptq", "lean-ptq", (64, 176))
    assert sum(k.endswith("._amax") for k in ckpt.state_dict) > 100
    cal = ckpt.meta["calibration"]
    assert (cal["method"], cal["batches"], cal["samples"]) == ("max", 1, 1)
    assert ckpt.meta["source"]["sha256"] == read_checkpoint(small_float_ckpt).sha256
    assert "nvidia-modelopt" in ckpt.meta["versions"]
    ranges = ckpt.meta["ranges"]  # every tensor above the floor, keyed by node name: the demo has none
    assert (ranges["bound"], ranges["samples"]) == (BOUND, 1) and ranges["floor"] < ranges["bound"]
    assert set(ranges) == {"bound", "floor", "samples", BACKBONE_FILE, VTRANSFORM_FILE}
    assert all(k.startswith("/") and v > ranges["floor"] for k, v in ranges[BACKBONE_FILE].items())
    assert not any(v > BOUND for v in ranges[BACKBONE_FILE].values())


def test_ptq_records_a_massive_activation(tmp_path, small_float_ckpt, example_dir):
    from helpers import BIG_RESNET, planted

    src = planted(small_float_ckpt, tmp_path / "big.pth", **BIG_RESNET)
    run_ptq(PTQOptions(ckpt=src, out=tmp_path / "ptq.pth", data=example_dir, method="max", progress=False))
    recorded = read_checkpoint(tmp_path / "ptq.pth").meta["ranges"][BACKBONE_FILE]
    assert recorded["/backbone/layer3/layer3.2/conv2/Conv"] > 9e4
    run_ptq(PTQOptions(ckpt=src, out=tmp_path / "no.pth", data=example_dir, method="max", progress=False,
                       ranges=False))
    assert "ranges" not in read_checkpoint(tmp_path / "no.pth").meta


def test_camera_only_branch_needs_no_lidar_points(tmp_path, example_dir):
    """MIT's camera-only branch (LSSTransform): PTQ, INT8 export and the BEV check run on data
    folders without points.tensor; a depth branch on the same folder says what is missing."""
    from lean.checkpoint import save_official
    from lean.data import load_example
    from lean.export import ExportOptions, export_camera
    from lean.scene import make_demo_model

    from helpers import SMALL, onnx_io

    data = tmp_path / "no-points"
    shutil.copytree(example_dir, data)
    (data / "points.tensor").unlink()
    cfg = SMALL.replace(vtransform="lss")
    save_official(tmp_path / "cam.pth", make_demo_model(cfg, load_example(example_dir, cfg.image_size, 2)).state_dict())
    run_ptq(PTQOptions(ckpt=tmp_path / "cam.pth", out=tmp_path / "ptq.pth", data=data, method="max", progress=False,
                       cameras=2, ranges=False))
    report = export_camera(ExportOptions(ckpt=tmp_path / "ptq.pth", out_dir=tmp_path / "o", data=data, cameras=2))
    assert report.facts["bev_check"]["ok"] and report.graphs[0].qdq_pairs > 50
    assert list(onnx_io(tmp_path / "o" / "camera.backbone.onnx"))[0] == "img" and "depth" not in onnx_io(
        tmp_path / "o" / "camera.backbone.onnx")
    with pytest.raises(LeanError) as e:
        run_ptq(PTQOptions(ckpt=tmp_path / "ptq.pth", out=tmp_path / "x.pth", data=data, progress=False))
    assert "already quantized" in one_line(e)
    save_official(tmp_path / "det.pth", make_demo_model(SMALL, load_example(example_dir, SMALL.image_size, 2)).state_dict())
    with pytest.raises(LeanError) as e:
        run_ptq(PTQOptions(ckpt=tmp_path / "det.pth", out=tmp_path / "x.pth", data=data, progress=False, cameras=2))
    assert "points.tensor" in one_line(e)


def test_the_range_record_takes_at_most_record_samples_spread_over_the_data():
    from lean.loader import FrameSet
    from lean.quantize import spread
    from lean.ranges import RECORD_SAMPLES

    frames = FrameSet(list(range(300)), str)
    picked = spread(frames, RECORD_SAMPLES).items
    assert len(picked) == len(set(picked)) == RECORD_SAMPLES == 32
    assert picked[0] == 0 and picked[-1] > 280  # from the first sample to near the last
    assert spread(FrameSet([1, 2], str), RECORD_SAMPLES).items == [1, 2]
