import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lean.errors import LeanError
from lean.export import BACKBONE_FILE, VTRANSFORM_FILE, ExportOptions, export_camera, ort_session, validate

from helpers import SMALL, onnx_io


def export(ckpt, out, data, **kw):
    return export_camera(ExportOptions(ckpt=ckpt, out_dir=out, data=data, cameras=SMALL.cameras, **kw))


@pytest.fixture(scope="module")
def int8(tmp_path_factory, small_ptq_ckpt, example_dir):
    out = tmp_path_factory.mktemp("int8")
    return export(small_ptq_ckpt, out, example_dir), out


@pytest.fixture(scope="module")
def fp16(tmp_path_factory, small_ptq_ckpt, example_dir):
    out = tmp_path_factory.mktemp("fp16")
    return export(small_ptq_ckpt, out, example_dir, fp16=True), out


def graph(path):
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return model, producers, inits


def dq_scale(node, producers, inits):
    scale = node.input[1]
    return inits[scale] if scale in inits else numpy_helper.to_array(producers[scale].attribute[0].t)


def test_contract_names_and_shapes(int8, fp16):
    for _, out in (int8, fp16):
        assert onnx_io(out / BACKBONE_FILE) == {
            "img": [1, 2, 3, 64, 176], "depth": [1, 2, 1, 64, 176],
            "camera_feature": [2, 8, 22, 80], "camera_depth_weights": [2, 118, 8, 22]}
        assert onnx_io(out / VTRANSFORM_FILE) == {"feat_in": [1, 80, 360, 360], "feat_out": [1, 80, 180, 180]}
        assert onnx.load(str(out / BACKBONE_FILE)).opset_import[0].version == 13


def test_every_conv_has_qdq_on_input_and_weight(int8):
    model, producers, inits = graph(int8[1] / BACKBONE_FILE)
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


def test_downsample_and_fp16_graphs_have_no_qdq(int8, fp16):
    for path in (int8[1] / VTRANSFORM_FILE, fp16[1] / VTRANSFORM_FILE, fp16[1] / BACKBONE_FILE):
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert not ops & {"QuantizeLinear", "DequantizeLinear"}, path


def test_residual_add_quantizes_only_the_identity(int8):
    model, producers, _ = graph(int8[1] / BACKBONE_FILE)
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) == 16
    for n in adds:
        kinds = sorted(producers[i].op_type for i in n.input)
        assert kinds == ["Conv", "DequantizeLinear"], n.name


def test_neck_concats_share_one_scale(int8):
    model, producers, inits = graph(int8[1] / BACKBONE_FILE)
    quantized = [n for n in model.graph.node if n.op_type == "Concat"
                 and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)]
    assert len(quantized) == 2
    for n in quantized:
        scales = {float(dq_scale(producers[i], producers, inits)) for i in n.input}
        assert len(scales) == 1, n.name


def test_report_and_metadata(int8):
    report, out = int8
    data = json.loads((out / "report.json").read_text())
    assert data["precision"] == "int8" and data["opset"] == 13
    assert data["checkpoint"]["source_format"] == "lean-ptq" and len(data["checkpoint"]["sha256"]) == 64
    assert set(data["files"]) == {BACKBONE_FILE, VTRANSFORM_FILE}
    for name in (BACKBONE_FILE, VTRANSFORM_FILE):
        f = data["files"][name]
        assert f["size"] == (out / name).stat().st_size and f["nodes"] > 0
        assert all(o["ok"] for o in f["outputs"].values())
    assert data["files"][BACKBONE_FILE]["qdq_pairs"] > 100
    assert data["bev_check"]["ok"] and data["bev_check"]["shape"] == [1, 80, 180, 180]
    props = {p.key: p.value for p in onnx.load(str(out / BACKBONE_FILE)).metadata_props}
    assert props["precision"] == "int8" and json.loads(props["calibration"])["method"] == "max"
    assert onnx.load(str(out / BACKBONE_FILE)).producer_name == "lean"


def test_fp16_graph_matches_pytorch_to_1e4(fp16):
    report, _ = fp16
    for g in report.graphs:
        for o in g.outputs.values():
            assert o["max_abs_err"] <= 1e-4 * o["ref_max_abs"]


def test_a_wrong_scale_fails_validation(int8, tmp_path, example_dir):
    """Validation must catch a broken graph: double one activation scale in the middle."""
    src = int8[1] / BACKBONE_FILE
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    target = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and "layer3" in n.name][0]
    scale_name = target.input[1]
    if scale_name in inits:
        arr = numpy_helper.to_array(inits[scale_name]) * 4
        inits[scale_name].CopyFrom(numpy_helper.from_array(arr, scale_name))
    else:
        const = next(n for n in model.graph.node if scale_name in n.output)
        arr = numpy_helper.to_array(const.attribute[0].t) * 4
        const.attribute[0].t.CopyFrom(numpy_helper.from_array(arr))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    good = ort_session(src)
    from lean.data import load_example
    from lean.geometry import depth_image
    sample = load_example(example_dir, image_size=SMALL.image_size, cameras=SMALL.cameras)
    depth = depth_image(sample.points, sample.lidar2image, sample.img_aug_matrix, SMALL.image_size)
    inputs = {"img": sample.img, "depth": depth}
    import torch
    reference = dict(zip(["camera_feature", "camera_depth_weights"],
                         (torch.from_numpy(a) for a in good.run(None, {k: v.numpy() for k, v in inputs.items()}))))
    validate(src, inputs, reference, "int8")  # the good graph passes against itself
    with pytest.raises(LeanError):
        validate(broken, inputs, reference, "int8")



def test_quantized_downsample_exports_with_qdq(tmp_path, small_float_ckpt, example_dir):
    from lean.ptq import run_ptq

    ckpt = tmp_path / "ptq_ds.pth"
    run_ptq(small_float_ckpt, ckpt, example_dir, "max", progress=False, log=lambda m: None, cameras=2,
            quantize_downsample=True)
    report = export(ckpt, tmp_path / "o", example_dir)
    vt = next(g for g in report.graphs if g.file == VTRANSFORM_FILE)
    assert vt.qdq_pairs == 6 and all(o["ok"] for o in vt.outputs.values())  # 3 convs: input + weight
