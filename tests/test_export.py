"""The export stage on the small config: the contract, Q/DQ placement, the report, and the rigs
(other backbones, camera counts, image sizes and BEV grids, all from the config)."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from polygraphy.json import load_json

from lean.checkpoint import read_checkpoint
from lean.layouts import infer_config
from lean.config import CameraConfig
from lean.errors import LeanError
from lean.export import BACKBONE_FILE, VTRANSFORM_FILE, ExportOptions, export_camera
from lean.quantize import PTQOptions, run_ptq
from lean.typecheck import FLOATS, value_types

from helpers import SMALL, assert_named_by_module, float_ckpt, onnx_io, polygraphy_onnxrt


def export(ckpt, out, data, **kw):
    return export_camera(ExportOptions(ckpt=ckpt, out_dir=out, data=data, cameras=SMALL.cameras, **kw))


@pytest.fixture(scope="module")
def int8(small_int8_export):
    return small_int8_export


@pytest.fixture(scope="module")
def int8_classic(small_classic_export):
    return small_classic_export


@pytest.fixture(scope="module")
def fp16(small_fp16_export):
    return small_fp16_export


@pytest.fixture(scope="module")
def fp16_classic(small_fp16_classic_export):
    return small_fp16_classic_export


INT8 = ["int8", "int8_classic"]
ALL = ["int8", "int8_classic", "fp16", "fp16_classic"]


def graph(path):
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return model, producers, inits


def dq_scale(node, producers, inits):
    scale = node.input[1]
    return inits[scale] if scale in inits else numpy_helper.to_array(producers[scale].attribute[0].t)


@pytest.mark.parametrize("which", ALL)
def test_contract_names_and_shapes(request, which):
    _, out = request.getfixturevalue(which)
    assert onnx_io(out / BACKBONE_FILE) == {
        "img": [1, 2, 3, 64, 176], "depth": [1, 2, 1, 64, 176],
        "camera_feature": [2, 8, 22, 80], "camera_depth_weights": [2, 118, 8, 22]}
    assert onnx_io(out / VTRANSFORM_FILE) == {"feat_in": [1, 80, 360, 360], "feat_out": [1, 80, 180, 180]}
    for name in (BACKBONE_FILE, VTRANSFORM_FILE):
        assert onnx.load(str(out / name)).opset_import[0].version == (13 if "classic" in which else 19)


@pytest.mark.parametrize("which", ALL)
def test_every_tensor_has_the_targets_type(request, which):
    """Typed: FP16 everywhere, inputs, outputs and Q/DQ scales included; classic: FP32 everywhere."""
    _, out = request.getfixturevalue(which)
    want = TensorProto.FLOAT if "classic" in which else TensorProto.FLOAT16
    for name in (BACKBONE_FILE, VTRANSFORM_FILE):
        model = onnx.load(str(out / name))
        types = value_types(model)
        floats = {n: t for n, t in types.items() if t in FLOATS}
        assert floats and set(floats.values()) == {want}, name
        assert {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)} == {want}
        assert not [n for n in model.graph.node if n.op_type == "Cast"]


def test_fp32_io_around_an_fp16_graph(tmp_path, small_ptq_ckpt, example_dir):
    report = export(small_ptq_ckpt, tmp_path, example_dir, fp16=True, io="fp32", check_bev=False)
    model = onnx.load(str(tmp_path / BACKBONE_FILE))
    assert {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)} == {TensorProto.FLOAT}
    assert [n.op_type for n in model.graph.node].count("Cast") == 4  # one per input and output
    assert report.facts["target"]["io"] == "fp32"
    # The engine binds FP32 here: the engine check files hold FP32, and Polygraphy passes them.
    g = report.graphs[0]
    assert g.engine_check["binding"] == "float32"
    assert {a.dtype for a in load_json(str(tmp_path / g.engine_check["files"][0]))[0].values()} == {np.dtype("float32")}
    r = polygraphy_onnxrt(g, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]


@pytest.mark.parametrize("which", INT8)
def test_every_conv_has_qdq_on_input_and_weight(request, which):
    model, producers, inits = graph(request.getfixturevalue(which)[1] / BACKBONE_FILE)
    conv = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(conv) == 63  # 53 backbone + 4 neck + 3 dtransform + 3 depthnet
    for n in conv:
        assert producers[n.input[0]].op_type == "DequantizeLinear", n.name
        assert producers[n.input[1]].op_type == "DequantizeLinear", n.name
    # int8 zero points, symmetric: zero point 0 everywhere
    for n in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        src = n.input[2]
        zp = inits.get(src) if src in inits else numpy_helper.to_array(producers[src].attribute[0].t)
        assert zp.dtype == np.int8 and not zp.any()


@pytest.mark.parametrize("which", ALL)
def test_downsample_and_fp16_graphs_have_no_qdq(request, which):
    _, out = request.getfixturevalue(which)
    for path in [out / VTRANSFORM_FILE] + ([out / BACKBONE_FILE] if which.startswith("fp16") else []):
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert not ops & {"QuantizeLinear", "DequantizeLinear"}, path


@pytest.mark.parametrize("which", INT8)
def test_residual_add_quantizes_only_the_identity(request, which):
    model, producers, _ = graph(request.getfixturevalue(which)[1] / BACKBONE_FILE)
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) == 16
    for n in adds:
        kinds = sorted(producers[i].op_type for i in n.input)
        assert kinds == ["Conv", "DequantizeLinear"], n.name


@pytest.mark.parametrize("which", INT8)
def test_neck_concats_share_one_scale(request, which):
    model, producers, inits = graph(request.getfixturevalue(which)[1] / BACKBONE_FILE)
    quantized = [n for n in model.graph.node if n.op_type == "Concat"
                 and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)]
    assert len(quantized) == 2
    for n in quantized:
        scales = {float(dq_scale(producers[i], producers, inits)) for i in n.input}
        assert len(scales) == 1, n.name


@pytest.mark.parametrize("which", INT8)
def test_report_and_metadata(request, which):
    report, out = request.getfixturevalue(which)
    classic = "classic" in which
    data = json.loads((out / "report.json").read_text())
    assert data["precision"] == "int8" and data["opset"] == (13 if classic else 19)
    assert data["target"]["tensorrt"] == ("8" if classic else "10")
    assert data["checkpoint"]["source_format"] == "lean-ptq" and len(data["checkpoint"]["sha256"]) == 64
    assert set(data["files"]) == {BACKBONE_FILE, VTRANSFORM_FILE}
    for name in (BACKBONE_FILE, VTRANSFORM_FILE):
        f = data["files"][name]
        assert f["size"] == (out / name).stat().st_size and f["nodes"] > 0
        assert all(o["ok"] for o in f["outputs"].values())
        assert f["simplify"]["nodes_before"] >= f["simplify"]["nodes_after"] == f["nodes"]
        assert f["build_command"].startswith(f"trtexec --onnx={out / name} ")
        # --int8 only where the file holds Q/DQ: the vtransform graph has none
        assert ("--int8" in f["build_command"]) == (classic and name == BACKBONE_FILE)
        assert ("--stronglyTyped" in f["build_command"]) != classic
        assert f"--exportLayerInfo={out / name[:-5]}.layers.json" in f["build_command"]
    assert data["files"][BACKBONE_FILE]["qdq_pairs"] > 100
    assert data["bev_check"]["ok"] and data["bev_check"]["shape"] == [1, 80, 180, 180]
    props = {p.key: p.value for p in onnx.load(str(out / BACKBONE_FILE)).metadata_props}
    assert props["precision"] == "int8" and json.loads(props["calibration"])["method"] == "max"
    assert props["tensorrt"] == data["target"]["tensorrt"] and props["typing"] == data["target"]["typing"]
    assert onnx.load(str(out / BACKBONE_FILE)).producer_name == "lean"


def test_fp16_graphs_match_pytorch(fp16, fp16_classic):
    for g in fp16_classic[0].graphs:  # FP32 tensors: to 1e-4 of the range
        for o in g.outputs.values():
            assert o["max_abs_err"] <= 1e-4 * o["ref_max_abs"]
    for g in fp16[0].graphs:  # FP16 tensors
        assert all(o["cosine"] >= 0.9995 for o in g.outputs.values())
    assert fp16[0].facts["bev_check"]["cosine"] >= 0.999


def test_typed_int8_matches_pytorch(int8):
    assert all(o["cosine"] >= 0.97 for g in int8[0].graphs for o in g.outputs.values())
    assert int8[0].facts["target"]["fp16_scales_clamped"] >= 0


def test_quantized_downsample_exports_with_qdq(tmp_path, small_float_ckpt, example_dir):
    ckpt = tmp_path / "ptq_ds.pth"
    run_ptq(PTQOptions(ckpt=small_float_ckpt, out=ckpt, data=example_dir, method="max", progress=False, cameras=2,
                       quantize_downsample=True, ranges=False))
    report = export(ckpt, tmp_path / "o", example_dir)
    vt = next(g for g in report.graphs if g.file == VTRANSFORM_FILE)
    assert vt.qdq_pairs == 6 and all(o["ok"] for o in vt.outputs.values())  # 3 convs: input + weight


# -- rigs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swint_ckpts(tmp_path_factory, example_dir):
    folder = tmp_path_factory.mktemp("swint")
    cfg = CameraConfig(backbone="swint", cameras=2, image_size=(64, 176))
    fl = float_ckpt(folder, example_dir, cfg)
    ptq = folder / "ptq.pth"
    run_ptq(PTQOptions(ckpt=fl, out=ptq, data=example_dir, method="max", cameras=2, progress=False, ranges=False))
    return fl, ptq


@pytest.mark.parametrize("tensorrt", ["10", "8"])
@pytest.mark.parametrize("fp16", [True, False])
def test_swint_exports_validate(tmp_path, swint_ckpts, example_dir, fp16, tensorrt):
    report = export_camera(ExportOptions(ckpt=swint_ckpts[1], out_dir=tmp_path, data=example_dir, cameras=2, fp16=fp16,
                                         tensorrt=tensorrt))
    assert all(o["ok"] for g in report.graphs for o in g.outputs.values()) and report.facts["bev_check"]["ok"]
    for g in report.graphs:  # the engine check command, with ONNX Runtime in place of TensorRT
        r = polygraphy_onnxrt(g, tmp_path)
        assert r.returncode == 0, r.stdout[-2000:]
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
            if n.op_type in ("Softmax", "ReduceMean", "LayerNormalization"):
                src = producers.get(n.input[0])
                assert src is None or src.op_type != "DequantizeLinear", n.name
    # TensorRT 8 parses opset 13, which has no LayerNormalization (opset 17): it is spelled out there.
    assert ("LayerNormalization" in ops) is (tensorrt != "8")


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
    assert infer_config(read_checkpoint(swint_ckpts[0]).state_dict, cameras=2).backbone == "swint"


@pytest.mark.parametrize("tensorrt", ["10", "8"])
def test_official_float_checkpoint_exports_fp16_to_both_targets(tmp_path, small_float_ckpt, example_dir, tensorrt):
    report = export(small_float_ckpt, tmp_path, example_dir, fp16=True, tensorrt=tensorrt)
    assert report.facts["checkpoint"]["source_format"] == "mit" and report.facts["bev_check"]["ok"]
    assert report.facts["target"]["tensorrt"] == tensorrt


# -- checkpoints in the wild: the exports compute what each trainer's own modules compute ---------
WILD = {  # case: (saver, builder kwargs, variant); tests/trainers.py builds and saves each as its trainer does
    "mit-camera-only": ("mit", dict(backbone="swint", vtransform="lss"), "swint+generalized_lss_fpn+lss"),
    "mmdet3d": ("mmdet3d", dict(backbone="swint"), "swint+generalized_lss_fpn+depth_lss"),
    "openpcdet": ("openpcdet", dict(backbone="swint"), "swint+generalized_lss_fpn+depth_lss"),
    "awml": ("awml", dict(backbone="resnet50", vtransform="awml", depthnet_bias=False),
             "resnet50+generalized_lss_fpn+awml"),
}


@pytest.fixture(scope="module")
def wild(tmp_path_factory, example_dir):
    """case -> (trainer's module, its checkpoint, the PTQ checkpoint made from it)."""
    import torch

    from lean.data import load_inputs

    from trainers import SAVERS, make_trainer_camera

    _, img, depth = load_inputs(example_dir, SMALL)
    out = {}
    for case, (saver, kw, _) in WILD.items():
        folder = tmp_path_factory.mktemp(case)
        theirs = make_trainer_camera(img, depth, xbound=(-51.2, 51.2, 0.8), **kw)
        SAVERS[saver](theirs, folder / "ckpt.pth")
        run_ptq(PTQOptions(ckpt=folder / "ckpt.pth", out=folder / "ptq.pth", data=example_dir, method="max",
                           progress=False, cameras=SMALL.cameras, ranges=False))
        out[case] = theirs, folder / "ckpt.pth", folder / "ptq.pth"
    torch.manual_seed(0)
    return out


def _cosine(a, b) -> float:
    a, b = (np.asarray(x, np.float64).ravel() for x in (a, b))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("tensorrt", ["8", "10"])
@pytest.mark.parametrize("case", list(WILD))
def test_wild_checkpoint_fp16_export_matches_the_trainers_forward(tmp_path, wild, example_dir, case, tensorrt):
    """TensorRT 8's FP32 graph within cosine 0.9999 of the trainer's modules, the typed FP16 graph 0.999,
    on inputs the export never saw."""
    import torch

    from lean.validate import feeds, ort_session

    theirs, ckpt, _ = wild[case]
    report = export(ckpt, tmp_path, example_dir, fp16=True, tensorrt=tensorrt)
    assert (report.facts["checkpoint"]["source_format"], report.facts["checkpoint"]["variant"]) == (
        case.split("-")[0], WILD[case][2])
    uses_depth = WILD[case][1].get("vtransform") != "lss"
    assert ("depth" in onnx_io(tmp_path / BACKBONE_FILE)) == uses_depth
    assert assert_named_by_module(tmp_path / BACKBONE_FILE) > 50  # names by module, whatever the layout
    g = torch.Generator().manual_seed(7)
    img = torch.randn(1, SMALL.cameras, 3, *SMALL.image_size, generator=g)
    depth = torch.rand(1, SMALL.cameras, 1, *SMALL.image_size, generator=g) * 40
    depth *= torch.rand(depth.shape, generator=g) > 0.97
    bev = torch.rand(1, 80, 128, 128, generator=g)
    with torch.no_grad():
        their_weights, their_feature = theirs(img, depth)
        their_bev = theirs.vtransform.downsample(bev)
    inputs = {"img": img, "depth": depth} if uses_depth else {"img": img}
    session = ort_session(tmp_path / BACKBONE_FILE)
    feature, weights = session.run(["camera_feature", "camera_depth_weights"], feeds(session, inputs))
    session = ort_session(tmp_path / VTRANSFORM_FILE)
    (out,) = session.run(["feat_out"], feeds(session, {"feat_in": bev}))
    need = 0.9999 if tensorrt == "8" else 0.999
    assert _cosine(feature.transpose(0, 3, 1, 2), their_feature) >= need
    assert _cosine(weights, their_weights) >= need
    assert _cosine(out, their_bev) >= need


@pytest.mark.parametrize("tensorrt", ["8", "10"])
@pytest.mark.parametrize("case", list(WILD))
def test_wild_checkpoint_int8_export_after_ptq(tmp_path, wild, example_dir, case, tensorrt):
    _, _, ptq = wild[case]
    report = export(ptq, tmp_path, example_dir, tensorrt=tensorrt)
    backbone = report.graphs[0]
    assert backbone.qdq_pairs > 50 and report.facts["bev_check"]["ok"]
    macs = backbone.lint["macs"]
    assert backbone.lint["verdict"] != "error" and macs.get("INT8", 0) / sum(macs.values()) > 0.9
    assert report.facts["checkpoint"]["variant"] == WILD[case][2]
