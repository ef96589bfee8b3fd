"""The camera branch as each trainer builds and saves it, written for the tests from the public
code's module structure (mmdet's SwinTransformer, torchvision's ResNet, MIT bevfusion's
GeneralizedLSSFPN / DepthLSSTransform / LSSTransform, tier4 AWML's DepthLSSTransform), and
independent of ``lean.models``: the exports of these checkpoints must compute what these
forwards compute.

Savers write each trainer's file layout: MIT's mmcv runner dict, mmengine's CheckpointHook file
(meta, message hub with HistoryBuffer objects holding numpy arrays, optimizer and scheduler
state; the mmengine class is a stand-in registered under its real module path while saving),
OpenPCDet's legacy-format ``model_state`` file.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# -- mmdet SwinTransformer (mmdet/models/backbones/swin.py) --------------------------------------
def window_partition(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows, h, w):
    ws = windows.shape[1]
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


class WindowMSA(nn.Module):
    def __init__(self, dims, heads, ws):
        super().__init__()
        self.heads, self.ws, self.scale = heads, ws, (dims // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.02)
        seq1, seq2 = torch.arange(0, (2 * ws - 1) * ws, 2 * ws - 1), torch.arange(0, ws, 1)
        coords = (seq1[:, None] + seq2[None, :]).reshape(1, -1)  # double_step_seq
        self.register_buffer("relative_position_index", (coords + coords.T).flip(1).contiguous())
        self.qkv = nn.Linear(dims, dims * 3)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class ShiftWindowMSA(nn.Module):
    def __init__(self, dims, heads, ws, shift):
        super().__init__()
        self.ws, self.shift = ws, shift
        self.w_msa = WindowMSA(dims, heads, ws)

    def forward(self, query, hw):
        b, _, c = query.shape
        h, w = hw
        ws, s = self.ws, self.shift
        query = query.view(b, h, w, c)
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        query = F.pad(query, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = query.shape[1], query.shape[2]
        mask = None
        if s > 0:
            query = torch.roll(query, shifts=(-s, -s), dims=(1, 2))
            img_mask = torch.zeros((1, hp, wp, 1))
            cnt = 0
            for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                    img_mask[:, hs, wsl, :] = cnt
                    cnt += 1
            mw = window_partition(img_mask, ws).view(-1, ws * ws)
            mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        windows = self.w_msa(window_partition(query, ws).view(-1, ws * ws, c), mask)
        x = window_reverse(windows.view(-1, ws, ws, c), hp, wp)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x[:, :h, :w, :].contiguous().view(b, h * w, c)


class FFN(nn.Module):
    def __init__(self, dims, hidden):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dims, hidden), nn.GELU(), nn.Dropout(0.0)),
                                    nn.Linear(hidden, dims), nn.Dropout(0.0))

    def forward(self, x, identity):
        return identity + self.layers(x)


class SwinBlock(nn.Module):
    def __init__(self, dims, heads, shift, ws=7):
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.attn = ShiftWindowMSA(dims, heads, ws, ws // 2 if shift else 0)
        self.norm2 = nn.LayerNorm(dims)
        self.ffn = FFN(dims, dims * 4)

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return self.ffn(self.norm2(x), identity=x)


class PatchMerging(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.sampler = nn.Unfold(kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(4 * cin)
        self.reduction = nn.Linear(4 * cin, 2 * cin, bias=False)

    def forward(self, x, hw):
        b, _, c = x.shape
        h, w = hw
        x = x.view(b, h, w, c).permute(0, 3, 1, 2)
        x = F.pad(x, (0, w % 2, 0, h % 2))  # AdaptivePadding, 'corner'
        out_hw = ((h + 1) // 2, (w + 1) // 2)
        return self.reduction(self.norm(self.sampler(x).transpose(1, 2))), out_hw


class SwinBlockSequence(nn.Module):
    def __init__(self, dims, heads, depth, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dims, heads, shift=i % 2 == 1) for i in range(depth))
        self.downsample = PatchMerging(dims) if downsample else None

    def forward(self, x, hw):
        for block in self.blocks:
            x = block(x, hw)
        if self.downsample is None:
            return x, hw, x, hw
        down, down_hw = self.downsample(x, hw)
        return down, down_hw, x, hw


class PatchEmbed(nn.Module):
    def __init__(self, dims=96):
        super().__init__()
        self.projection = nn.Conv2d(3, dims, 4, stride=4)
        self.norm = nn.LayerNorm(dims)

    def forward(self, x):
        x = self.projection(x)
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


class SwinTransformer(nn.Module):
    def __init__(self, dims=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), out_indices=(1, 2, 3)):
        super().__init__()
        self.out_indices = out_indices
        self.patch_embed = PatchEmbed(dims)
        self.stages = nn.ModuleList(SwinBlockSequence(dims * 2**i, heads[i], depths[i], i < len(depths) - 1)
                                    for i in range(len(depths)))
        self.num_features = [dims * 2**i for i in range(len(depths))]
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, x):
        x, hw = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, hw, out, out_hw = stage(x, hw)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, *out_hw, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return outs


# -- torchvision ResNet50 without fc ------------------------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = (nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
                           if stride != 1 or cin != planes * 4 else None)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layers = []
            for j in range(blocks):
                layers.append(Bottleneck(cin, planes, stride if j == 0 else 1))
                cin = planes * 4
            self.add_module(f"layer{i}", nn.Sequential(*layers))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            if i > 1:
                outs.append(x)
        return outs


# -- MIT bevfusion neck and view transforms ------------------------------------------------------
class ConvModule(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class GeneralizedLSSFPN(nn.Module):
    def __init__(self, in_channels, out=256):
        super().__init__()
        levels = len(in_channels) - 1
        self.lateral_convs = nn.ModuleList(
            ConvModule(in_channels[i] + (in_channels[i + 1] if i == levels - 1 else out), out, 1) for i in range(levels))
        self.fpn_convs = nn.ModuleList(ConvModule(out, out, 3) for _ in range(levels))

    def forward(self, inputs):
        laterals = list(inputs)
        for i in range(len(laterals) - 2, -1, -1):
            x = F.interpolate(laterals[i + 1], size=laterals[i].shape[2:], mode="bilinear", align_corners=False)
            laterals[i] = self.fpn_convs[i](self.lateral_convs[i](torch.cat([laterals[i], x], dim=1)))
        return laterals[: len(inputs) - 1]


def gen_dx_bx(xbound, ybound, zbound):
    dx = torch.Tensor([row[2] for row in (xbound, ybound, zbound)])
    bx = torch.Tensor([row[0] + row[2] / 2.0 for row in (xbound, ybound, zbound)])
    nx = torch.LongTensor([(row[1] - row[0]) / row[2] for row in (xbound, ybound, zbound)])
    return dx, bx, nx


class BaseTransform(nn.Module):
    def __init__(self, image_size, feature_size, xbound, ybound, zbound, dbound, out_channels):
        super().__init__()
        self.C = out_channels
        dx, bx, nx = gen_dx_bx(xbound, ybound, zbound)
        self.dx, self.bx, self.nx = (nn.Parameter(t, requires_grad=False) for t in (dx, bx, nx))
        (ih, iw), (fh, fw) = image_size, feature_size
        ds = torch.arange(*dbound, dtype=torch.float).view(-1, 1, 1).expand(-1, fh, fw)
        d = ds.shape[0]
        xs = torch.linspace(0, iw - 1, fw, dtype=torch.float).view(1, 1, fw).expand(d, fh, fw)
        ys = torch.linspace(0, ih - 1, fh, dtype=torch.float).view(1, fh, 1).expand(d, fh, fw)
        self.frustum = nn.Parameter(torch.stack((xs, ys, ds), -1), requires_grad=False)
        self.D = d

    def split(self, x):
        """depth [BN,D,fH,fW] and features [BN,C,fH,fW] as get_cam_feats forms them before their product."""
        return x[:, : self.D].softmax(dim=1), x[:, self.D : self.D + self.C]


def _bev_downsample(c):
    return [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True),
            nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]


def _lidar_depth_net(bias=True):
    return [nn.Conv2d(1, 8, 1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(True),
            nn.Conv2d(8, 32, 5, stride=4, padding=2, bias=bias), nn.BatchNorm2d(32), nn.ReLU(True),
            nn.Conv2d(32, 64, 5, stride=2, padding=2, bias=bias), nn.BatchNorm2d(64), nn.ReLU(True)]


class DepthLSSTransform(BaseTransform):
    def __init__(self, in_channels=256, **kw):
        super().__init__(**kw)
        self.dtransform = nn.Sequential(*_lidar_depth_net())
        self.depthnet = nn.Sequential(
            nn.Conv2d(in_channels + 64, in_channels, 3, padding=1), nn.BatchNorm2d(in_channels), nn.ReLU(True),
            nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.BatchNorm2d(in_channels), nn.ReLU(True),
            nn.Conv2d(in_channels, self.D + self.C, 1))
        self.downsample = nn.Sequential(*_bev_downsample(self.C))

    def get_cam_feats(self, x, d):
        return self.split(self.depthnet(torch.cat([self.dtransform(d), x], dim=1)))


class LSSTransform(BaseTransform):
    def __init__(self, in_channels=256, **kw):
        super().__init__(**kw)
        self.depthnet = nn.Conv2d(in_channels, self.D + self.C, 1)
        self.downsample = nn.Sequential(*_bev_downsample(self.C))

    def get_cam_feats(self, x, d=None):
        return self.split(self.depthnet(x))


class _Net(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class AWMLDepthLSSTransform(BaseTransform):
    """AWML's DepthLSSTransform after its PR #149: LidarDepthImageNet, DepthLSSNet, DownSampleNet."""

    def __init__(self, in_channels=256, dtransform_bias=True, depthnet_bias=True, **kw):
        super().__init__(**kw)
        cin, bias = in_channels + 64, depthnet_bias
        self.dtransform = _Net(_lidar_depth_net(dtransform_bias))
        self.depthnet = _Net([nn.Conv2d(cin, cin, 3, padding=1, bias=bias), nn.BatchNorm2d(cin), nn.ReLU(True),
                              nn.Conv2d(cin, cin, 3, padding=1, bias=bias), nn.BatchNorm2d(cin), nn.ReLU(True),
                              nn.Conv2d(cin, self.D + self.C, 1)])
        self.downsample = _Net(_bev_downsample(self.C))

    def get_cam_feats(self, x, d):
        return self.split(self.depthnet(torch.cat([self.dtransform(d), x], dim=1)))


class AWMLLSSTransform(LSSTransform):
    """AWML's camera-only LSSTransform: MIT's, with its downsample in a DownSampleNet."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.downsample = _Net(list(self.downsample))


VIEW_TRANSFORMS = {"depth_lss": DepthLSSTransform, "lss": LSSTransform, "awml": AWMLDepthLSSTransform,
                   "awml_lss": AWMLLSSTransform}


class TrainerCamera(nn.Module):
    """backbone -> neck[0] -> view transform, as the trainers' extract_camera_features runs them."""

    def __init__(self, backbone="swint", vtransform="depth_lss", image_size=(64, 176),
                 xbound=(-54.0, 54.0, 0.3), dbound=(1.0, 60.0, 0.5), **vt_kw):
        super().__init__()
        self.backbone = SwinTransformer() if backbone == "swint" else ResNet50()
        self.neck = GeneralizedLSSFPN((192, 384, 768) if backbone == "swint" else (512, 1024, 2048))
        fs = (image_size[0] // 8, image_size[1] // 8)
        self.vtransform = VIEW_TRANSFORMS[vtransform](
            image_size=image_size, feature_size=fs, xbound=xbound, ybound=xbound, zbound=(-10.0, 10.0, 20.0),
            dbound=dbound, out_channels=80, **vt_kw)

    def forward(self, img, depth=None):
        """img [B,N,3,H,W], depth [B,N,1,H,W] -> depth weights [BN,D,fH,fW], features [BN,C,fH,fW]."""
        b, n, c, h, w = img.shape
        x = self.neck(self.backbone(img.view(b * n, c, h, w)))[0]
        return self.vtransform.get_cam_feats(x, None if depth is None else depth.view(b * n, 1, h, w))


@torch.no_grad()
def make_trainer_camera(img, depth, seed=0, **kw) -> TrainerCamera:
    """A TrainerCamera with random weights and BN statistics from one batch (a trained network's
    activation scale; random statistics would make the deep backbones chaotic)."""
    torch.manual_seed(seed)
    model = TrainerCamera(**kw)
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.constant_(m.bn3.weight, 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    _, feat = model(img, depth)
    bev = torch.randn(1, 80, 32, 32).abs() * feat.std()
    model.vtransform.downsample(bev)
    return model.eval()


# -- how each trainer saves -----------------------------------------------------------------------
LIDAR_KEYS = ("backbone_3d.conv_input.0.weight", "pts_backbone.blocks.0.0.weight", "fuser.0.weight",
              "heads.object.heatmap_head.0.weight")


def _lidar(prefix=""):
    return {prefix + k: torch.randn(4, 4) for k in LIDAR_KEYS}


def renamed(model: TrainerCamera, backbone: str, neck: str, vtransform: str) -> OrderedDict:
    out = OrderedDict()
    for k, v in model.state_dict().items():
        part, rest = k.split(".", 1)
        out[{"backbone": backbone, "neck": neck, "vtransform": vtransform}[part] + rest] = v
    return out


def save_mit(model, path):
    sd = renamed(model, "encoders.camera.backbone.", "encoders.camera.neck.", "encoders.camera.vtransform.")
    sd.update(_lidar("encoders.lidar."))
    torch.save({"state_dict": sd, "meta": {"epoch": 6, "iter": 1000, "mmcv_version": "1.4.0",
                                            "CLASSES": ["car", "truck"], "config": "model = dict(...)"}}, path)


class HistoryBuffer:
    """Stand-in for ``mmengine.logging.history_buffer.HistoryBuffer``: the same pickled state."""

    def __init__(self, values=(0.1, 0.2), max_length=1000000):
        self.max_length = max_length
        self._log_history = np.array(values, dtype=np.float64)
        self._count_history = np.ones(len(values), dtype=np.int64)
        self.statistics_methods = {"min": HistoryBuffer.min, "max": HistoryBuffer.max,
                                   "current": HistoryBuffer.current, "mean": HistoryBuffer.mean}

    def min(self):
        return self._log_history.min()

    def max(self):
        return self._log_history.max()

    def current(self):
        return self._log_history[-1]

    def mean(self):
        return self._log_history.mean()


@contextlib.contextmanager
def mmengine_installed():
    """The stand-in importable as mmengine.logging.history_buffer.HistoryBuffer while pickling."""
    names = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    mods[names[-1]].HistoryBuffer = HistoryBuffer
    module, HistoryBuffer.__module__ = HistoryBuffer.__module__, names[-1]
    sys.modules.update(mods)
    try:
        yield
    finally:
        HistoryBuffer.__module__ = module
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def mmengine_checkpoint(state_dict: OrderedDict, extra_hub=None) -> dict:
    """What mmengine's CheckpointHook writes around a state dict."""
    param = nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([param], lr=2e-4)
    param.sum().backward()
    opt.step()
    hub = {"log_scalars": OrderedDict({"train/lr": HistoryBuffer((2e-4, 1e-4)), "train/loss": HistoryBuffer((3.0, 2.5))}),
           "runtime_info": OrderedDict({"epoch": 12, "iter": 1000, "cfg": "model = dict(...)", "seed": 0,
                                        "dataset_meta": {"classes": ("car", "truck")}, "best_score": np.float64(0.6),
                                        "last_ckpt": "work_dirs/epoch_12.pth", **(extra_hub or {})}),
           "resumed_keys": OrderedDict({"epoch": False, "iter": False})}
    return {"meta": {"epoch": 12, "iter": 1000, "cfg": "model = dict(...)", "seed": 0, "experiment_name": "bevfusion",
                     "time": "20261124_120000", "mmengine_version": "0.10.4", "dataset_meta": {"classes": ("car", "truck")}},
            "state_dict": state_dict, "message_hub": hub, "optimizer": opt.state_dict(),
            "param_schedulers": [{"T_max": 20, "eta_min": 0.0, "by_epoch": True, "last_step": 12,
                                  "base_values": [2e-4], "_last_value": [1e-4]}]}


def save_mmengine(model, path, extra_hub=None):
    """mmdetection3d 1.x / AWML: ``img_backbone.``, ``img_neck.``, ``view_transform.``."""
    sd = renamed(model, "img_backbone.", "img_neck.", "view_transform.")
    sd.update(_lidar())
    with mmengine_installed():
        torch.save(mmengine_checkpoint(sd, extra_hub), path)


def save_openpcdet(model, path):
    """OpenPCDet's train_utils.save_checkpoint: legacy (non-zip) torch.save, numpy scalars in the optimizer state."""
    sd = renamed(model, "image_backbone.", "neck.", "vtransform.")
    sd.update(_lidar())
    sd["global_step"] = torch.tensor(1000)
    param = nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([param], lr=np.float64(1e-3))
    torch.save({"epoch": 20, "it": 1000, "model_state": sd, "optimizer_state": opt.state_dict(),
                "version": "pcdet+0.6.0+8caccce"}, path, _use_new_zipfile_serialization=False)


SAVERS = {"mit": save_mit, "mmdet3d": save_mmengine, "awml": save_mmengine, "openpcdet": save_openpcdet}
