"""The naming pass: every node of both files named by the module that made it, TorchScript style."""

import onnx
import pytest
import torch

from lean.export import BACKBONE_FILE, VTRANSFORM_FILE
from lean.models import BackboneGraph, VTransformGraph, build_camera
from lean.names import branch_path, scope_map, scoped_name, unique
from lean.trace import CastIO

from helpers import SMALL, assert_named_by_module


def test_scoped_name_spells_list_indices_with_their_list():
    assert scoped_name("backbone.layer3.3.conv2", "Conv") == "/backbone/layer3/layer3.3/conv2/Conv"
    assert scoped_name("backbone.stages.2.blocks.1.attn.w_msa.qkv", "MatMul") == \
        "/backbone/stages/stages.2/blocks/blocks.1/attn/w_msa/qkv/MatMul"
    assert scoped_name("", "Reshape") == "/Reshape"


def test_unique_counts_up_from_the_second():
    taken = set()
    assert [unique("/a/Add", taken) for _ in range(3)] == ["/a/Add", "/a/Add_1", "/a/Add_2"]


def test_paths_are_relative_to_the_camera_branch_whatever_the_wrapper():
    branch = build_camera(SMALL)
    backbone = scope_map(BackboneGraph(branch), branch)
    assert backbone == {"branch": ""}
    assert branch_path("branch.backbone.layer1.0.conv1", backbone) == "backbone.layer1.0.conv1"
    vt = scope_map(VTransformGraph(branch), branch)
    assert branch_path("downsample.0", vt) == "vtransform.downsample.0"
    cast = scope_map(CastIO(BackboneGraph(branch)), branch)
    assert branch_path("inner.branch.neck", cast) == "neck" and branch_path("inner", cast) == ""


@pytest.mark.parametrize("which", ["small_int8_export", "small_classic_export"])
def test_every_node_is_named_by_its_module(request, which):
    report, out = request.getfixturevalue(which)
    assert assert_named_by_module(out / BACKBONE_FILE) > 50  # every conv of ResNet50, the neck and the depthnet
    assert assert_named_by_module(out / VTRANSFORM_FILE) == 3
    graph = onnx.load(str(out / BACKBONE_FILE)).graph
    names = {n.name for n in graph.node}
    assert {"/backbone/layer3/layer3.3/conv2/Conv", "/backbone/layer3/layer3.3/conv2/input_quantizer/QuantizeLinear",
            "/backbone/layer3/layer3.3/conv2/weight_quantizer/DequantizeLinear"} <= names
    assert "backbone.layer3.3.conv2.weight" in {i.name for i in graph.initializer}
    lint = report.graphs[0].lint
    assert all(o.startswith("/") for f in lint["findings"] for o in f["offenders"] if "/" in o)


def test_names_are_the_same_in_every_export(small_int8_export, tmp_path, small_ptq_ckpt, example_dir):
    from lean.export import ExportOptions, export_camera

    export_camera(ExportOptions(ckpt=small_ptq_ckpt, out_dir=tmp_path, data=example_dir, cameras=SMALL.cameras))
    for name in (BACKBONE_FILE, VTRANSFORM_FILE):
        assert (tmp_path / name).read_bytes() == (small_int8_export[1] / name).read_bytes()


def test_fp16_and_fp32_traces_name_alike(small_ptq_ckpt):
    """lean.ptq measures ranges on an FP32 trace, the export on FP16: the names must meet."""
    from lean.build import build_model, resolve_config
    from lean.checkpoint import read_checkpoint
    from lean.ranges import graph_proto

    ckpt = read_checkpoint(small_ptq_ckpt)
    cfg = resolve_config(ckpt)
    names = []
    for dtype in (torch.float32, torch.float16):
        model = build_model(ckpt, cfg, "int8").to(dtype)
        img = torch.zeros(1, cfg.cameras, 3, *cfg.image_size, dtype=dtype)
        proto = graph_proto(BackboneGraph(model), model, {"img": img, "depth": img[:, :, :1]},
                            ["camera_feature", "camera_depth_weights"])
        names.append([n.name for n in proto.graph.node])
    assert names[0] == names[1]
