"""CUDA-BEVFusion's pickled PTQ model (``bevfusion_ptq.pth``) and pytorch-quantization state dicts.

The real file needs mmcv, mmdet3d, pytorch-quantization and spconv to write, so a stand-in is
written here: classes under the original module paths (registered in ``sys.modules`` only while
``torch.save`` runs), the object layout CUDA-BEVFusion's qat/ptq.py leaves behind (BN folded to
Identity, QuantConv2d with ``_input_quantizer``/``_weight_quantizer``, shared quantizers, helper
objects as patched ``forward``s, calibrators with histograms, storages tagged ``cuda:0``, the
lidar branch, fuser, decoder and heads), filled with the folded weights and amax of a native PTQ
model of ours. Reading it must give back exactly that native model.
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import os
import pathlib
import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lean.quantize
from helpers import SMALL, assert_named_by_module, one_line, sample_inputs
from lean.build import build_quantized, fold_bn
from lean.checkpoint import map_legacy_state_dict, read_checkpoint, save_checkpoint
from lean.layouts import infer_config
from lean.legacy import concat_levels, quantizer_name
from lean.data import load_inputs
from lean.errors import LeanError
from lean.export import BACKBONE_FILE, VTRANSFORM_FILE, ExportOptions, export_camera
from lean.quant.modelopt import calibrate, insert_quantizers
from lean.scene import make_demo_model
from lean.validate import feeds, ort_session


STANDIN_CLASSES: list[type] = []


def _cls(path: str, base=nn.Module, **body):
    module, _, name = path.rpartition(".")
    cls = type(name, (base,), {"__module__": module, "__qualname__": name, **body})
    STANDIN_CLASSES.append(cls)
    return cls


def _keep_obj(self, obj, *args):
    self.obj = obj
    if args:
        self.is_fuse_relu = args[0]


def _record(self, **kwargs):
    if isinstance(self, nn.Module):
        nn.Module.__init__(self)
    for k, v in kwargs.items():
        setattr(self, k, v)


# -- the stand-in's classes, under the paths the real file names ----------------------------------
MMDataParallel = _cls("mmcv.parallel.data_parallel.MMDataParallel", __init__=_record)
BEVFusion = _cls("mmdet3d.models.fusion_models.bevfusion.BEVFusion", __init__=_record)
ResNet = _cls("mmdet.models.backbones.resnet.ResNet", __init__=_record)
Bottleneck = _cls("mmdet.models.backbones.resnet.Bottleneck", __init__=_record)
GeneralizedLSSFPN = _cls("mmdet3d.models.necks.generalized_lss.GeneralizedLSSFPN", __init__=_record)
ConvModule = _cls("mmcv.cnn.bricks.conv_module.ConvModule", __init__=_record)
DepthLSSTransform = _cls("mmdet3d.models.vtransforms.depth_lss.DepthLSSTransform", __init__=_record)
QuantConv2d = _cls("pytorch_quantization.nn.modules.quant_conv.QuantConv2d", nn.Conv2d)
TensorQuantizer = _cls("pytorch_quantization.nn.modules.tensor_quantizer.TensorQuantizer", __init__=_record)
HistogramCalibrator = _cls("pytorch_quantization.calib.histogram.HistogramCalibrator", object, __init__=_record)
MaxCalibrator = _cls("pytorch_quantization.calib.max.MaxCalibrator", object, __init__=_record)
QuantConcat = _cls("lean.quantize.QuantConcat", __init__=_record)
QuantAdd = _cls("lean.quantize.QuantAdd", __init__=_record)
hook_bottleneck_forward = _cls("lean.quantize.hook_bottleneck_forward", object, __init__=_keep_obj)
hook_generalized_lss_fpn_forward = _cls("lean.quantize.hook_generalized_lss_fpn_forward", object, __init__=_keep_obj)
# lidar branch (MIT BEVFusion's own spconv copy, quantized by CUDA-BEVFusion), fuser, decoder, heads
Voxelization = _cls("mmdet3d.ops.voxel.voxelize.Voxelization", __init__=_record)
SparseEncoder = _cls("mmdet3d.models.backbones.sparse_encoder.SparseEncoder", __init__=_record)
SparseSequential = _cls("mmdet3d.ops.spconv.modules.SparseSequential", nn.Sequential)
SparseConvolutionQunat = _cls("lean.quantize.SparseConvolutionQunat", __init__=_record)
SparseBasicBlock = _cls("mmdet3d.ops.sparse_block.SparseBasicBlock", __init__=_record)
new_sparse_basic_block_forward = _cls("lean.funcs.new_sparse_basic_block_forward", object, __init__=_keep_obj)
ConvFuser = _cls("mmdet3d.models.fusers.conv.ConvFuser", nn.Sequential)
SECOND = _cls("mmdet3d.models.backbones.second.SECOND", __init__=_record)
SECONDFPN = _cls("mmdet3d.models.necks.second.SECONDFPN", __init__=_record)
TransFusionHead = _cls("mmdet3d.models.heads.bbox.transfusion.TransFusionHead", __init__=_record)
FocalLoss = _cls("mmdet.models.losses.focal_loss.FocalLoss", __init__=_record)
L1Loss = _cls("mmdet.models.losses.smooth_l1_loss.L1Loss", __init__=_record)
GaussianFocalLoss = _cls("mmdet.models.losses.gaussian_focal_loss.GaussianFocalLoss", __init__=_record)
TransFusionBBoxCoder = _cls("mmdet3d.core.bbox.coders.transfusion_bbox_coder.TransFusionBBoxCoder", object,
                            __init__=_record)
HungarianAssigner3D = _cls("mmdet3d.core.bbox.assigners.hungarian_assigner.HungarianAssigner3D", object,
                           __init__=_record)
FocalLossCost = _cls("mmdet.core.bbox.match_costs.match_cost.FocalLossCost", object, __init__=_record)
PseudoSampler = _cls("mmdet.core.bbox.samplers.pseudo_sampler.PseudoSampler", object, __init__=_record)
ConfigDict = _cls("mmcv.utils.config.ConfigDict", dict)
ConvAlgo = enum.Enum("ConvAlgo", {"Native": 0, "MaskImplicitGemm": 1}, module="spconv.core", qualname="ConvAlgo")
STANDIN_CLASSES.append(ConvAlgo)


@contextlib.contextmanager
def registered():
    """The stand-in classes findable under their original paths, storages tagged ``cuda:0``.

    Only while writing: ``lean.quantize`` is our real module, so the CUDA-BEVFusion helper names go
    on it as temporary attributes; the other packages are fake module objects. torch.save asks
    ``torch.serialization.location_tag`` for each storage's tag, so patching it writes exactly the
    tag a GPU-saved file carries without needing a GPU.
    """
    with pytest.MonkeyPatch.context() as mp:
        for cls in STANDIN_CLASSES:
            parts = cls.__module__.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    mp.setitem(sys.modules, name, types.ModuleType(name))
            mp.setattr(sys.modules[cls.__module__], cls.__qualname__, cls, raising=False)
        mp.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        yield


# -- native model -> stand-in tree -------------------------------------------------------------------
class StandIn:
    """Copies a native PTQ model into CUDA-BEVFusion's object layout."""

    def __init__(self, native: nn.Module, disabled=()):
        self.memo: dict[int, nn.Module] = {}
        self.disabled = {id(native.get_submodule(n)) for n in disabled}

    def quantizer(self, nq, weight: bool):
        if id(nq) in self.memo:  # shared in ours, shared (same object) in theirs
            return self.memo[id(nq)]
        amax = nq.amax.detach().clone().float()
        if weight:
            calib = MaxCalibrator(_num_bits=8, _axis=0, _unsigned=False, _track_amax=False, _amaxs=[],
                                  _calib_amax=amax.clone())
        else:
            calib = HistogramCalibrator(_num_bits=8, _axis=None, _unsigned=False, _num_bins=2048, _skip_zeros=False,
                                        _torch_hist=True, _grow_method="append",
                                        _calib_hist=torch.arange(2048, dtype=torch.int64),
                                        _calib_bin_edges=torch.linspace(0, float(amax) * 1.5, 2049))
        q = TensorQuantizer(_num_bits=8, _unsigned=False, _narrow_range=False, _fake_quant=True,
                            _axis=0 if weight else None, _learn_amax=False, _scale_amax=None, _if_quant=True,
                            _if_clip=False, _if_calib=False, _disabled=id(nq) in self.disabled, _calibrator=calib)
        q.register_buffer("_amax", amax)
        q._scale = 127.0 / amax  # set by forward; a plain attribute, not a buffer
        self.memo[id(nq)] = q
        return q

    def conv(self, n):
        quantized = not n.input_quantizer._disabled  # the vtransform downsample stays a plain conv
        cls = QuantConv2d if quantized else nn.Conv2d
        c = cls(n.in_channels, n.out_channels, n.kernel_size, stride=n.stride, padding=n.padding, bias=True,
                device="meta")
        c.weight = nn.Parameter(n.weight.detach().clone())  # BN folded in, as mmcv's _fuse_conv_bn leaves it
        c.bias = nn.Parameter(n.bias.detach().clone())
        if quantized:
            c._input_quantizer = self.quantizer(n.input_quantizer, weight=False)
            c._weight_quantizer = self.quantizer(n.weight_quantizer, weight=True)
        return c

    def sequential(self, seq):
        return nn.Sequential(*[self.conv(m) if isinstance(m, nn.Conv2d) else
                               nn.ReLU(inplace=True) if isinstance(m, nn.ReLU) else nn.Identity() for m in seq])

    def bottleneck(self, nb):
        b = Bottleneck(norm1_name="bn1", norm2_name="bn2", norm3_name="bn3", style="pytorch", with_cp=False,
                       stride=nb.conv2.stride[0], dilation=1)
        b.conv1, b.bn1 = self.conv(nb.conv1), nn.Identity()
        b.conv2, b.bn2 = self.conv(nb.conv2), nn.Identity()
        b.conv3, b.bn3 = self.conv(nb.conv3), nn.Identity()
        b.relu = nn.ReLU(inplace=True)
        b.downsample = None if nb.downsample is None else nn.Sequential(self.conv(nb.downsample[0]), nn.Identity())
        b.residual_quantizer = self.quantizer(nb.residual_quantizer, weight=False)
        b.forward = hook_bottleneck_forward(b)
        return b

    def camera(self, native: nn.Module) -> nn.ModuleDict:
        nb, nn_, nv = native.backbone, native.neck, native.vtransform
        backbone = ResNet(depth=50, out_indices=(1, 2, 3), norm_eval=False, zero_init_residual=True,
                          res_layers=["layer1", "layer2", "layer3", "layer4"])
        backbone.conv1, backbone.bn1, backbone.relu = self.conv(nb.conv1), nn.Identity(), nn.ReLU(inplace=True)
        backbone.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, stage in enumerate(nb.stages):
            setattr(backbone, f"layer{i + 1}", nn.Sequential(*[self.bottleneck(b) for b in stage]))

        neck = GeneralizedLSSFPN(in_channels=list(nn_.in_channels), out_channels=256, start_level=0,
                                 upsample_cfg={"mode": "bilinear", "align_corners": False})
        for kind in ("lateral_convs", "fpn_convs"):
            setattr(neck, kind, nn.ModuleList([
                ConvModule(conv=self.conv(m.conv), bn=nn.Identity(), activate=nn.ReLU(inplace=True), norm_name="bn",
                           with_norm=True, with_activation=True, order=("conv", "norm", "act"))
                for m in getattr(nn_, kind)]))
        # Their patched neck forward numbers the concats top-down: quant_concat0 serves the top level.
        levels = len(nn_.lateral_convs)
        for j in range(levels):
            ours = getattr(nn_, f"quant_concat{levels - 1 - j}")
            setattr(neck, f"quant_concat{j}", QuantConcat(_input_quantizer=self.quantizer(ours, weight=False),
                                                          _fake_quant=True, quantization=True))
        neck.forward = hook_generalized_lss_fpn_forward(neck)

        vt = DepthLSSTransform(image_size=list(SMALL.image_size), feature_size=list(SMALL.feature_size),
                               C=SMALL.bev_channels, D=SMALL.depth_bins, in_channels=256, out_channels=80)
        for name in ("dx", "bx", "nx", "frustum"):  # nn.Parameter(requires_grad=False) in BEVFusion
            setattr(vt, name, nn.Parameter(getattr(nv, name).clone(), requires_grad=False))
        vt.dtransform, vt.depthnet = self.sequential(nv.dtransform), self.sequential(nv.depthnet)
        vt.downsample = self.sequential(nv.downsample)
        return nn.ModuleDict({"backbone": backbone, "neck": neck, "vtransform": vt})


def _quant_conv(cin, cout, k, disabled=False):
    c = QuantConv2d(cin, cout, k, padding=k // 2)
    for name, shape in (("_input_quantizer", ()), ("_weight_quantizer", (cout, 1, 1, 1))):
        q = TensorQuantizer(_num_bits=8, _disabled=disabled, _calibrator=None)
        q.register_buffer("_amax", torch.ones(shape))
        setattr(c, name, q)
    return c


def other_branches() -> dict:
    """The detector around the camera, none of which the reader may need or run."""
    quant_in = TensorQuantizer(_num_bits=8, _disabled=True, _calibrator=None)  # conv_input: disabled there
    quant_in.register_buffer("_amax", torch.tensor(3.0))
    sparse = SparseConvolutionQunat(ndim=3, in_channels=5, out_channels=16, kernel_size=[3, 3, 3], subm=True,
                                    indice_key="subm1", act_type="ReLU", algo=ConvAlgo.Native)
    sparse.weight = nn.Parameter(torch.randn(3, 3, 3, 5, 16))
    sparse._input_quantizer, sparse._weight_quantizer = quant_in, TensorQuantizer(_num_bits=8, _disabled=True)
    block = SparseBasicBlock()
    block.conv1 = SparseSequential(nn.ReLU())
    block.quant_add = QuantAdd(_input_quantizer=TensorQuantizer(_num_bits=8), _fake_quant=True, quantization=True)
    block.forward = new_sparse_basic_block_forward(block, True)
    lidar_backbone = SparseEncoder(sparse_shape=[1440, 1440, 41], order=("conv", "norm", "act"))
    lidar_backbone.conv_input = SparseSequential(sparse)
    lidar_backbone.encoder_layers = nn.ModuleList([block])
    lidar = nn.ModuleDict({
        "voxelize": Voxelization(voxel_size=[0.075, 0.075, 0.2],
                                 point_cloud_range=[-54.0, -54.0, -5.0, 54.0, 54.0, 3.0],
                                 max_num_points=10, max_voxels=(120000, 160000)),
        "backbone": lidar_backbone,
    })
    fuser = ConvFuser(_quant_conv(12, 8, 3), nn.Identity(), nn.ReLU(True))
    decoder = nn.ModuleDict({
        "backbone": SECOND(blocks=nn.ModuleList([nn.Sequential(_quant_conv(8, 8, 3), nn.Identity(), nn.ReLU())])),
        "neck": SECONDFPN(deblocks=nn.ModuleList([nn.Sequential(_quant_conv(8, 8, 1, disabled=True), nn.ReLU())])),
    })
    head = TransFusionHead(
        num_proposals=200,
        loss_cls=FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25, reduction="mean", loss_weight=1.0),
        loss_bbox=L1Loss(reduction="mean", loss_weight=0.25), loss_heatmap=GaussianFocalLoss(reduction="mean"),
        train_cfg=ConfigDict(dataset="nuScenes", grid_size=[1440, 1440, 41], out_size_factor=8,
                             assigner=ConfigDict(type="HungarianAssigner3D",
                                                 iou_calculator={"type": "BboxOverlaps3D"})),
        test_cfg=ConfigDict(dataset="nuScenes", nms_type=None, pc_range=[-54.0, -54.0]),
    )
    head.bbox_coder = TransFusionBBoxCoder(pc_range=[-54.0, -54.0], out_size_factor=8, voxel_size=[0.075, 0.075],
                                           post_center_range=np.array([-61.2, -61.2, -10, 61.2, 61.2, 10], np.float32),
                                           code_size=10)
    head.bbox_assigner = HungarianAssigner3D(cls_cost=FocalLossCost(gamma=2, alpha=0.25, weight=0.15))
    head.bbox_sampler = PseudoSampler()
    head.heatmap_head = nn.Sequential(nn.Conv2d(8, 10, 3, padding=1))
    return {"lidar": lidar, "fuser": fuser, "decoder": decoder, "heads": nn.ModuleDict({"object": head})}


def standin_model(native, disabled=(), camera=True):
    """MMDataParallel(BEVFusion) as CUDA-BEVFusion's qat/ptq.py saves it."""
    rest = other_branches()
    encoders = {"lidar": rest["lidar"]}
    if camera:
        encoders = {"camera": StandIn(native, disabled).camera(native), **encoders}
    bev = BEVFusion(loss_scale={"object": 1.0})
    bev.encoders = nn.ModuleDict(encoders)
    bev.fuser, bev.decoder, bev.heads = rest["fuser"], rest["decoder"], rest["heads"]
    return MMDataParallel(module=bev, dim=0, device_ids=[0], output_device=0, src_device_obj=torch.device("cuda", 0))


def write_standin(model, path, zip_format=True):
    with registered():
        torch.save(model, path, _use_new_zipfile_serialization=zip_format)
    return path


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native(example_dir, tmp_path_factory):
    """A native PTQ model of ours on the small config and its checkpoint in our own format."""
    sample, img, depth = load_inputs(example_dir, SMALL)
    model = insert_quantizers(fold_bn(make_demo_model(SMALL, sample)), "max")
    # Calibrated on the scene the export validates with (as lean.ptq does): scales from random
    # images clip the scene's activations, and the INT8 graph then drifts past the export's bound.
    calibrate(model, [(img, depth)], "max")
    path = tmp_path_factory.mktemp("native") / "ptq.pth"
    save_checkpoint(path, model.state_dict(), "ptq", SMALL, {"calibration": {"method": "max", "batches": 1}})
    return types.SimpleNamespace(model=model.eval(), path=path, sd=model.state_dict())


@pytest.fixture(scope="module")
def standin(native, tmp_path_factory):
    model = standin_model(native.model)
    path = write_standin(model, tmp_path_factory.mktemp("standin") / "bevfusion_ptq.pth")
    return types.SimpleNamespace(model=model, path=path)


@pytest.fixture(scope="module")
def standin_ckpt(standin):
    return read_checkpoint(standin.path)


def outputs(model, seed=3):
    img, depth = sample_inputs(SMALL, seed=seed)
    with torch.no_grad():
        return model(img, depth)


# -- the stand-in ------------------------------------------------------------------------------------
def test_standin_is_faithful(standin):
    """What the reader is up against is really there: original class paths, cuda:0 tags, no leftovers."""
    with zipfile.ZipFile(standin.path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    for name in (b"mmcv.parallel.data_parallel\nMMDataParallel",
                 b"pytorch_quantization.nn.modules.quant_conv\nQuantConv2d",
                 b"lean.quantize\nhook_bottleneck_forward", b"lean.quantize\nhook_generalized_lss_fpn_forward",
                 b"pytorch_quantization.calib.histogram\nHistogramCalibrator", b"spconv.core\nConvAlgo",
                 b"lean.funcs\nnew_sparse_basic_block_forward", b"mmcv.utils.config\nConfigDict"):
        assert name in data, name
    assert b"cuda:0" in data and b"X\x03\x00\x00\x00cpu" not in data
    # The writing-time registrations are gone again.
    assert "mmcv" not in sys.modules and "pytorch_quantization" not in sys.modules
    assert not hasattr(lean.quantize, "hook_bottleneck_forward")


def test_cuda_tag_is_what_torch_itself_would_honour(tmp_path):
    """The patched tag is the real thing: torch's own loader tries to restore on the GPU."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine a cuda:0 storage simply loads")
    path = tmp_path / "t.pth"
    with registered():
        torch.save({"t": torch.ones(2)}, path)
    with pytest.raises(Exception, match="CUDA"):
        torch.load(path, weights_only=True)


def test_pickle_reads_as_the_native_ptq_checkpoint(standin_ckpt, native):
    ckpt = standin_ckpt
    assert (ckpt.kind, ckpt.source, ckpt.disabled_quantizers) == ("ptq", "cuda-bevfusion-pickle", ())
    # Every name, weights and amax, shared quantizers under each of their names, lands on ours.
    assert set(ckpt.state_dict) == set(native.sd)
    for key, value in native.sd.items():
        assert ckpt.state_dict[key].dtype == value.dtype and torch.equal(ckpt.state_dict[key], value), key
    assert not any(k.startswith("vtransform.downsample.") and k.endswith("_amax") for k in ckpt.state_dict)
    assert infer_config(ckpt.state_dict, cameras=SMALL.cameras) == SMALL
    assert ckpt.meta["legacy"]["shared"] > 0
    # Reading imported none of the packages the file names.
    assert "mmcv" not in sys.modules and "pytorch_quantization" not in sys.modules


def test_pickle_builds_the_native_model(standin_ckpt, native):
    model = build_quantized(SMALL, standin_ckpt.state_dict, standin_ckpt.disabled_quantizers)
    for a, b in zip(outputs(model), outputs(native.model)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tensorrt", ["10", "8"])
def test_pickle_exports_the_native_onnx(standin, native, example_dir, tmp_path, tensorrt):
    for name, ckpt in (("native", native.path), ("legacy", standin.path)):
        export_camera(ExportOptions(ckpt=ckpt, out_dir=tmp_path / name, data=example_dir, cameras=2, tensorrt=tensorrt,
                                    image_size=(64, 176), rebuild_frustum=False, check_bev=False))
    for file in (BACKBONE_FILE, VTRANSFORM_FILE):  # the legacy pickle's nodes named as the native file's
        names = [[n.name for n in onnx.load(str(tmp_path / name / file)).graph.node] for name in ("native", "legacy")]
        assert names[0] == names[1]
    assert assert_named_by_module(tmp_path / "legacy" / BACKBONE_FILE) > 50
    img, depth = sample_inputs(SMALL, seed=4)
    inputs = {BACKBONE_FILE: {"img": img, "depth": depth},
              VTRANSFORM_FILE: {"feat_in": torch.randn(1, 80, 360, 360, generator=torch.Generator().manual_seed(5))}}
    for file, tensors in inputs.items():
        ours, theirs = (ort_session(tmp_path / name / file) for name in ("native", "legacy"))
        for a, b in zip(ours.run(None, feeds(ours, tensors)), theirs.run(None, feeds(theirs, tensors))):
            assert a.shape == b.shape and np.abs(a.astype(np.float32) - b).max() <= 1e-6, file


def test_disabled_quantizers_are_reported_by_our_names(native, tmp_path):
    """A disabled quantizer (here a shared one, and in the old non-zip format) is exported without Q/DQ."""
    off = ("backbone.layer1.1.conv1.input_quantizer", "vtransform.depthnet.6.input_quantizer")
    path = write_standin(standin_model(native.model, disabled=off), tmp_path / "old.pth", zip_format=False)
    ckpt = read_checkpoint(path)
    assert ckpt.disabled_quantizers == ("backbone.layer1.1.conv1.input_quantizer",
                                        "backbone.layer1.1.residual_quantizer",
                                        "vtransform.depthnet.6.input_quantizer")
    assert not any(k.startswith(off) for k in ckpt.state_dict)
    legacy = build_quantized(SMALL, ckpt.state_dict, ckpt.disabled_quantizers)
    same = build_quantized(SMALL, native.sd, ckpt.disabled_quantizers)
    for a, b, full in zip(outputs(legacy), outputs(same), outputs(native.model)):
        assert torch.equal(a, b) and not torch.equal(a, full)


def test_state_dict_variants_load_the_same_model(standin, standin_ckpt, tmp_path):
    """pytorch-quantization names in a state dict (with or without the ``state_dict`` wrapper)."""
    sd = standin.model.module.state_dict()  # encoders.camera.*, encoders.lidar.*, fuser.*, ...
    assert "encoders.camera.neck.quant_concat0._input_quantizer._amax" in sd
    assert "encoders.camera.backbone.layer1.0.conv1._input_quantizer._amax" in sd
    for name, obj, source in (("official.pth", {"state_dict": sd}, "cuda-bevfusion-mit"),
                              ("bare.pth", dict(sd), "cuda-bevfusion-mit")):
        torch.save(obj, tmp_path / name)
        ckpt = read_checkpoint(tmp_path / name)
        assert (ckpt.kind, ckpt.source) == ("ptq", source)
        assert set(ckpt.state_dict) == set(standin_ckpt.state_dict)
        assert all(torch.equal(v, standin_ckpt.state_dict[k]) for k, v in ckpt.state_dict.items())


def test_concat_numbering_follows_the_neck_levels(native):
    """Their quant_concat0 serves the top level, our quant_concat0 the bottom one."""
    sd = StandIn(native.model).camera(native.model).state_dict()
    assert concat_levels(sd) == {0: 1, 1: 0}
    assert quantizer_name("neck.quant_concat0._input_quantizer", {0: 1, 1: 0}) == "neck.quant_concat1"
    # Without the lateral convs' amax to tell, the top-down numbering is assumed.
    bare = {k: v for k, v in sd.items() if "lateral_convs" not in k}
    assert concat_levels(bare) == {0: 1, 1: 0}
    mapped = map_legacy_state_dict(bare).state_dict
    assert torch.equal(mapped["neck.quant_concat0._amax"], native.sd["neck.quant_concat0._amax"])


def test_pickle_without_camera_branch_is_refused(native, tmp_path):
    path = write_standin(standin_model(native.model, camera=False), tmp_path / "lidar_only.pth")
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    assert "camera" in one_line(e) and "lidar_only.pth" in one_line(e)


def test_damaged_pickle_is_one_line(standin, tmp_path):
    """A cut data.pkl inside an intact zip: the restricted reader, not torch, meets the damage."""
    path = tmp_path / "cut.pth"
    with zipfile.ZipFile(standin.path) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 2] if item.filename.endswith("/data.pkl") else data)
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    assert "not a readable pickled model" in one_line(e)


def test_state_dict_with_unsafe_extras_loads(standin, standin_ckpt, tmp_path):
    """An official-layout dict whose meta holds numpy and mmcv objects: torch's safe loader
    refuses those globals, the restricted reader keeps only the tensors."""
    obj = {"state_dict": standin.model.module.state_dict(),
           "meta": {"config": ConfigDict(seed=0), "mean": np.zeros(3, np.float32), "epoch": 20}}
    with registered():
        torch.save(obj, tmp_path / "det.pth")
    ckpt = read_checkpoint(tmp_path / "det.pth")
    assert (ckpt.kind, ckpt.source) == ("ptq", "cuda-bevfusion-mit")
    assert set(ckpt.state_dict) == set(standin_ckpt.state_dict)
    assert all(torch.equal(v, standin_ckpt.state_dict[k]) for k, v in ckpt.state_dict.items())
