"""FP32 islands: which nodes, the Casts around them, and what a user's globs and flags do."""

import numpy as np
import onnx_ir as ir
import pytest
import torch

from lean.errors import LeanError
from lean.islands import check_globs, choose, kept_nodes, make_islands, overflow_check, parse_globs
from lean.names import FP32_NOTE
from lean.ranges import BOUND, measure, twin

from helpers import Massive, one_line, run_onnx, traced


def _measured(module):
    model, weights = traced(module, torch.randn(1, 3, 8))
    ranges = measure(twin(model, weights), [{"x": torch.randn(1, 3, 8).numpy()}])
    return model, weights, ranges


def test_the_island_is_the_maker_and_the_readers_of_a_tensor_past_the_bound():
    model, _, ranges = _measured(Massive())
    names, reasons = choose(model, ranges, BOUND, {})
    assert names == {"/fc1/Add", "/norm/LayerNormalization"}
    assert reasons["/fc1/Add"].startswith("makes /fc1/Add") and "reads /fc1/Add" in reasons["/norm/LayerNormalization"]
    assert choose(model, ranges, 2e5, {})[0] == set()


def test_an_island_validates_where_all_fp16_overflows():
    module = Massive()
    model, weights, ranges = _measured(module)
    x = torch.randn(1, 3, 8)
    all_fp16 = run_onnx(ir.to_proto(model), x)
    assert not np.isfinite(all_fp16).all()  # the overflow a user would get from TensorRT
    islands = make_islands(model, ranges, BOUND, {}, source=weights)
    assert len(islands) == 1 and islands[0].tensor == "/fc1/Add" and islands[0].max > 9e4
    assert islands[0].nodes == ["/fc1/Add", "/norm/LayerNormalization"]
    got, want = run_onnx(ir.to_proto(model), x), module(x).detach().numpy()
    cos = float(np.dot(got.ravel(), want.ravel()) / np.linalg.norm(got) / np.linalg.norm(want))
    assert np.isfinite(got).all() and cos > 0.9995
    assert all(FP32_NOTE in n.metadata_props for n in model.graph if n.name in islands[0].nodes)


def test_keep_fp32_globs_match_a_module_or_any_module_above_a_node():
    model, _, ranges = _measured(Massive(big=1.0))
    assert parse_globs(" fc2, norm ,") == ["fc2", "norm"]
    assert set(kept_nodes(model, ["fc2"])) == {"/fc2/MatMul", "/fc2/Add"}
    assert set(kept_nodes(model, ["fc*"])) == {"/fc1/MatMul", "/fc1/Add", "/fc2/MatMul", "/fc2/Add"}
    kept = kept_nodes(model, ["norm"])
    islands = make_islands(model, ranges, BOUND, kept)
    assert [(i.nodes, i.tensor, i.kept) for i in islands] == [(["/norm/LayerNormalization"], None, ["norm"])]


def test_a_glob_that_matches_nothing_names_near_modules():
    modules = {"backbone.layer3.2.conv2", "backbone.layer3.2.conv1", "neck.lateral_convs.0"}
    check_globs(["backbone.layer3.*", "neck.*"], modules)
    with pytest.raises(LeanError) as e:
        check_globs(["backbone.layer3.2.conv9"], modules)
    assert "matches no module" in one_line(e) and "backbone.layer3.2.conv2" in one_line(e)


def test_no_islands_means_an_overflow_is_one_line():
    _, _, ranges = _measured(Massive())
    with pytest.raises(LeanError) as e:
        overflow_check(ranges)
    assert "/fc1/Add of module fc1" in one_line(e) and "drop --no-fp32-islands" in one_line(e)
    overflow_check(_measured(Massive(big=1e4))[2])  # past the bound, within FP16: not an overflow


# -- through the export: checkpoints built to look trained ------------------------------------------
@pytest.fixture(scope="module")
def massive(tmp_path_factory, small_float_ckpt, example_dir):
    """Float and PTQ checkpoints of a SwinT whose stage-3 residual stream carries three channels at
    1e5 (LayerNorm after it), and of a ResNet50 with one conv output channel at 1e5."""
    from lean.config import CameraConfig
    from lean.quantize import PTQOptions, run_ptq

    from helpers import BIG_RESNET, MASSIVE_SWINT, float_ckpt, planted

    folder = tmp_path_factory.mktemp("massive")
    swint = float_ckpt(folder, example_dir, CameraConfig(backbone="swint", cameras=2, image_size=(64, 176)))
    ckpts = {"swint": planted(swint, folder / "swint.pth", **MASSIVE_SWINT),
             "resnet50": planted(small_float_ckpt, folder / "resnet50.pth", **BIG_RESNET)}
    out = {}
    for name, path in ckpts.items():
        run_ptq(PTQOptions(ckpt=path, out=folder / f"{name}_ptq.pth", data=example_dir, method="max", cameras=2,
                           progress=False))
        out[name] = (path, folder / f"{name}_ptq.pth")
    return out


def _export(ckpt, out, data, **kw):
    from lean.export import ExportOptions, export_camera

    return export_camera(ExportOptions(ckpt=ckpt, out_dir=out, data=data, cameras=2, **kw))


@pytest.mark.parametrize("backbone", ["swint", "resnet50"])
@pytest.mark.parametrize("fp16,tensorrt", [(True, "10"), (False, "10"), (False, "8")])
def test_massive_activations_export_and_validate_with_islands(massive, tmp_path, example_dir, backbone, fp16,
                                                              tensorrt):
    import onnx

    from lean.export import BACKBONE_FILE

    float_ckpt, ptq = massive[backbone]
    report = _export(float_ckpt if fp16 else ptq, tmp_path, example_dir, fp16=fp16, tensorrt=tensorrt)
    assert all(o["ok"] for g in report.graphs for o in g.outputs.values()) and report.facts["bev_check"]["ok"]
    if fp16 and tensorrt == "10":
        assert min(o["cosine"] for g in report.graphs for o in g.outputs.values()) >= 0.9995
    islands = report.facts["target"]["fp32_islands"]
    assert islands and all(i["max"] > 9e4 and i["bound"] == BOUND for i in islands)
    # The stage that carries the channels, and the stage output's LayerNorm.
    stage = ("/backbone/stages/stages.2/", "/backbone/norm2/") if backbone == "swint" else ("/backbone/layer3/layer3.2/",)
    assert all(n.startswith(stage) for i in islands for n in i["nodes"])
    macs = {}
    for g in report.graphs:
        for k, v in g.lint["macs"].items():
            macs[k] = macs.get(k, 0) + v
    if tensorrt != "8":  # a classic file is FP32 throughout: its builder flags choose
        assert macs.get("FP32", 0) <= 0.1 * sum(macs.values())  # >= 90 % still in FP16 / INT8
    graph = onnx.load(str(tmp_path / BACKBONE_FILE)).graph
    declared = {n.name for n in graph.node if any(p.key == FP32_NOTE for p in n.metadata_props)}
    if tensorrt == "8":  # the file stays FP32; the build command pins the island's layers
        assert not declared and "--layerPrecisions=" in report.graphs[0].build_command
    else:
        assert {n for i in islands for n in i["nodes"]} <= declared
        assert "--layerPrecisions" not in report.graphs[0].build_command


def test_without_the_islands_validation_fails_on_nan(massive, tmp_path, example_dir, monkeypatch):
    """The proof has no hole: the same file all-FP16 (the overflow check skipped) is refused."""
    from lean import export

    monkeypatch.setattr(export, "overflow_check", lambda ranges: None)
    with pytest.raises(LeanError) as e:
        _export(massive["swint"][0], tmp_path / "o", example_dir, fp16=True, fp32_islands=False)
    text = one_line(e)
    assert "NaN or Inf" in text and "first made by /backbone/stages/stages.2/blocks/blocks.0/" in text
    assert not (tmp_path / "o").exists()


def test_no_fp32_islands_names_the_overflowing_tensor(massive, tmp_path, example_dir):
    with pytest.raises(LeanError) as e:
        _export(massive["resnet50"][0], tmp_path / "o", example_dir, fp16=True, fp32_islands=False)
    assert "tensor /backbone/layer3/layer3.2/conv2/Conv of module backbone.layer3.2.conv2" in one_line(e)


def test_keep_fp32_by_hand(small_ptq_ckpt, tmp_path, example_dir):
    report = _export(small_ptq_ckpt, tmp_path, example_dir, keep_fp32="backbone.layer1.0.conv2,vtransform.downsample.*")
    islands = report.facts["target"]["fp32_islands"]
    assert [i["keep_fp32"] for i in islands] == [["backbone.layer1.0.conv2"], ["vtransform.downsample.*"]]
    assert "/backbone/layer1/layer1.0/conv2/Conv" in islands[0]["nodes"] and islands[0]["tensor"] is None
    assert report.graphs[1].lint["macs"] == {"FP32": sum(report.graphs[1].lint["macs"].values())}
    for bad, words in ((dict(keep_fp32="backbone.layer1.0.conv9"), "near: backbone.layer1.0.conv"),
                       (dict(keep_fp32="neck.*", fp32_islands=False), "contradict")):
        with pytest.raises(LeanError) as e:
            _export(small_ptq_ckpt, tmp_path / "bad", example_dir, **bad)
        assert words in one_line(e)


def test_a_checkpoint_that_makes_inf_in_fp32_names_the_module(small_float_ckpt, tmp_path, example_dir):
    from helpers import planted, scaling, setting

    ckpt = planted(small_float_ckpt, tmp_path / "inf.pth", backbone__layer1__0__bn1__bias=setting([0, 1, 2], 3e38),
                   backbone__layer1__0__conv2__weight=scaling(slice(None), 1e3))
    with pytest.raises(LeanError) as e:
        _export(ckpt, tmp_path / "o", example_dir, fp16=True)
    assert "FP32 forward makes NaN or Inf" in one_line(e) and "module backbone.layer1.0." in one_line(e)
