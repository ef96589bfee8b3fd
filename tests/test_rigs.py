"""Issue 5: other backbones and rigs — camera count, image size and BEV grid from the config."""

import onnx
import pytest

from lean.checkpoint import save_official
from lean.config import CameraConfig
from lean.data import load_example
from lean.demo import make_demo_model
from lean.errors import LeanError
from lean.export import BACKBONE_FILE, VTRANSFORM_FILE, ExportOptions, export_camera
from lean.ptq import run_ptq

from helpers import onnx_io


def float_ckpt(tmp_path, example_dir, cfg):
    sample = load_example(example_dir, image_size=cfg.image_size, cameras=cfg.cameras)
    path = tmp_path / f"{cfg.backbone}-{cfg.image_size[0]}x{cfg.image_size[1]}.pth"
    save_official(path, make_demo_model(cfg, sample).state_dict())
    return path


@pytest.fixture(scope="module")
def swint_ckpts(tmp_path_factory, example_dir):
    folder = tmp_path_factory.mktemp("swint")
    cfg = CameraConfig(backbone="swint", cameras=2, image_size=(64, 176))
    fl = float_ckpt(folder, example_dir, cfg)
    ptq = folder / "ptq.pth"
    run_ptq(fl, ptq, example_dir, "max", cameras=2, progress=False, log=lambda m: None)
    return fl, ptq


@pytest.mark.parametrize("fp16", [True, False])
def test_swint_exports_validate(tmp_path, swint_ckpts, example_dir, fp16):
    report = export_camera(ExportOptions(ckpt=swint_ckpts[1], out_dir=tmp_path, data=example_dir, cameras=2, fp16=fp16))
    assert all(o["ok"] for g in report.graphs for o in g.outputs.values()) and report.facts["bev_check"]["ok"]
    graph = onnx.load(str(tmp_path / BACKBONE_FILE)).graph
    ops = [n.op_type for n in graph.node]
    assert ("QuantizeLinear" in ops) is (not fp16)
    if not fp16:
        producers = {o: n for n in graph.node for o in n.output}
        # Linear layers (MatMul/Gemm with a weight) carry Q/DQ on both inputs; LayerNorm and
        # softmax inputs stay float.
        def source(name):  # skip the Transpose of a Linear weight
            node = producers.get(name)
            return producers.get(node.input[0]) if node is not None and node.op_type == "Transpose" else node

        linear = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and source(n.input[1]) is not None
                  and source(n.input[1]).op_type == "DequantizeLinear"]
        assert len(linear) == 12 * 4 + 3  # qkv, proj and two FFN layers per block, 3 patch mergings
        assert all(source(n.input[0]).op_type == "DequantizeLinear" for n in linear)
        for n in graph.node:
            if n.op_type in ("Softmax", "ReduceMean"):
                src = producers.get(n.input[0])
                assert src is None or src.op_type != "DequantizeLinear", n.name


def test_five_cameras(tmp_path, example_dir):
    cfg = CameraConfig(cameras=5, image_size=(64, 176))
    ckpt = float_ckpt(tmp_path, example_dir, cfg)
    export_camera(ExportOptions(ckpt=ckpt, out_dir=tmp_path / "o", data=example_dir, cameras=5, fp16=True))
    shapes = onnx_io(tmp_path / "o" / BACKBONE_FILE)
    assert shapes["img"] == [1, 5, 3, 64, 176] and shapes["camera_feature"] == [5, 8, 22, 80]


def test_other_image_size_needs_rebuild_then_follows(tmp_path, example_dir, small_float_ckpt):
    with pytest.raises(LeanError) as e:
        export_camera(ExportOptions(ckpt=small_float_ckpt, out_dir=tmp_path, data=example_dir, cameras=2, fp16=True,
                                    image_size=(96, 264)))
    assert "64x176" in str(e.value) and "--rebuild-frustum" in str(e.value) and "\n" not in str(e.value)
    # 96x264 has the ratio of 384x1056: the stand-in of the big rig in the fast tests.
    export_camera(ExportOptions(ckpt=small_float_ckpt, out_dir=tmp_path, data=example_dir, cameras=2, fp16=True,
                                image_size=(96, 264), rebuild_frustum=True))
    shapes = onnx_io(tmp_path / BACKBONE_FILE)
    assert shapes["img"] == [1, 2, 3, 96, 264]
    assert shapes["camera_feature"] == [2, 12, 33, 80] and shapes["camera_depth_weights"] == [2, 118, 12, 33]


def test_bev_grid_from_flags(tmp_path, example_dir, small_float_ckpt):
    grid = (-51.2, 51.2, 0.4)
    with pytest.raises(LeanError):
        export_camera(ExportOptions(ckpt=small_float_ckpt, out_dir=tmp_path, data=example_dir, cameras=2, fp16=True,
                                    xbound=grid, ybound=grid))
    export_camera(ExportOptions(ckpt=small_float_ckpt, out_dir=tmp_path, data=example_dir, cameras=2, fp16=True,
                                xbound=grid, ybound=grid, rebuild_frustum=True))
    assert onnx_io(tmp_path / VTRANSFORM_FILE) == {"feat_in": [1, 80, 256, 256], "feat_out": [1, 80, 128, 128]}


def test_backbone_flag_must_match_the_checkpoint(tmp_path, example_dir, small_float_ckpt):
    with pytest.raises(LeanError) as e:
        export_camera(ExportOptions(ckpt=small_float_ckpt, out_dir=tmp_path, data=example_dir, cameras=2, fp16=True,
                                    backbone="swint"))
    assert "resnet50" in str(e.value)


def test_swint_config_is_read_from_its_keys(swint_ckpts):
    from lean.checkpoint import infer_config, read_checkpoint

    assert infer_config(read_checkpoint(swint_ckpts[0]).state_dict, cameras=2).backbone == "swint"
