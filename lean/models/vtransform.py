"""The learned halves of BEVFusion's camera-to-BEV view transform, one class per trainer variant.

The two halves the exporter needs live here: per-camera depth distribution and features
(``forward``), and the BEV ``downsample``. Geometry and pooling between them are runtime work
(``lean.geometry``). Module names follow each trainer's checkpoints:

- ``DepthLSSTransform`` (MIT bevfusion, mmdetection3d 1.x, OpenPCDet): depth image -> ``dtransform``,
  concatenated before the image feature -> three-conv ``depthnet``;
- ``LSSTransform`` (MIT camera-only): no depth input, ``depthnet`` is one 1x1 conv;
- ``AWMLDepthLSSTransform`` (tier4 AWML): the same computation as DepthLSSTransform with its
  own widths and its convs wrapped in ``.net`` Sequentials; AWML's LSSTransform is
  ``LSSTransform`` with its downsample wrapped the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from lean.config import CameraConfig
from lean.geometry import create_frustum, voxel_grid


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, bias: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(True)]


def _downsample(c: int, stride: int) -> nn.Sequential:
    """BEV [B,C,X,Y] -> [B,C,X/stride,Y/stride]: conv3x3, conv3x3 with the stride, conv3x3; no biases."""
    return nn.Sequential(
        *_conv_bn_relu(c, c, 3, bias=False),
        *_conv_bn_relu(c, c, 3, stride=stride, bias=False),
        *_conv_bn_relu(c, c, 3, bias=False),
    )


def _dtransform(widths: tuple[int, int, int], bias: bool) -> nn.Sequential:
    """Sparse depth image [B,1,H,W] -> [B,widths[2],H/8,W/8]: conv1x1, conv5x5 s4, conv5x5 s2."""
    a, b, c = widths
    return nn.Sequential(*_conv_bn_relu(1, a, 1, bias=bias), *_conv_bn_relu(a, b, 5, stride=4, bias=bias),
                         *_conv_bn_relu(b, c, 5, stride=2, bias=bias))


class _Net(nn.Module):
    """AWML wraps each of its view transform's Sequentials in a module holding it as ``net``."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BaseTransform(nn.Module):
    """What every variant stores and outputs: the geometry buffers and the depth/feature split."""

    uses_depth = True

    def __init__(self, cfg: CameraConfig):
        super().__init__()
        self.D = cfg.depth_bins
        self.C = cfg.bev_channels
        dx, bx, nx = voxel_grid(cfg.xbound, cfg.ybound, cfg.zbound)
        # Stored in official checkpoints; derived data, but kept so a checkpoint made for another
        # image size or grid is caught instead of silently producing wrong geometry.
        self.register_buffer("dx", dx)
        self.register_buffer("bx", bx)
        self.register_buffer("nx", nx)
        self.register_buffer("frustum", create_frustum(cfg.image_size, cfg.feature_size, cfg.dbound))

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """depthnet output [B*N, D+C, fH, fW] -> (features NHWC, depth weights softmaxed over D)."""
        weights = x[:, : self.D].softmax(dim=1)
        # NHWC so the C channels of a pixel are contiguous for the runtime's BEV-pool kernel.
        features = x[:, self.D : self.D + self.C].permute(0, 2, 3, 1)
        return features, weights


class DepthLSSTransform(BaseTransform):
    def __init__(self, cfg: CameraConfig):
        super().__init__(cfg)
        self.dtransform = _dtransform((8, 32, 64), bias=True)
        width = cfg.depthnet_width
        self.depthnet = nn.Sequential(
            *_conv_bn_relu(cfg.neck_channels + 64, width, 3),
            *_conv_bn_relu(width, width, 3),
            nn.Conv2d(width, self.D + self.C, 1),
        )
        self.downsample = _downsample(self.C, cfg.downsample)

    def forward(self, feat: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feat [B*N, 256, fH, fW], depth image [B*N, 1, H, W] -> (features NHWC, depth weights)."""
        d = self.dtransform(depth)
        return self.split(self.depthnet(torch.cat([d, feat], dim=1)))  # depth channels come first, as trained


class LSSTransform(BaseTransform):
    """MIT's (and AWML's) camera-only transform: depth and features from the image feature alone."""

    uses_depth = False

    def __init__(self, cfg: CameraConfig):
        super().__init__(cfg)
        self.depthnet = nn.Conv2d(cfg.neck_channels, self.D + self.C, 1)
        downsample = _downsample(self.C, cfg.downsample)
        self.downsample = _Net(*downsample) if cfg.vtransform == "awml_lss" else downsample

    def forward(self, feat: torch.Tensor, depth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.depthnet(feat))


class AWMLDepthLSSTransform(BaseTransform):
    """tier4 AWML's DepthLSSTransform (since its PR #149): ``LidarDepthImageNet``, ``DepthLSSNet``
    and ``DownSampleNet``, each holding its layers as ``.net``. The depthnet keeps the width of
    its input (neck + 64 channels: 320 -> 320 -> 320 -> D+C); some versions drop the biases of
    the dtransform and depthnet hidden convs (``cfg.dtransform_bias``, ``cfg.depthnet_bias``)."""

    def __init__(self, cfg: CameraConfig):
        super().__init__(cfg)
        self.dtransform = _Net(*_dtransform((8, 32, 64), bias=cfg.dtransform_bias))
        width, bias = cfg.depthnet_width, cfg.depthnet_bias
        self.depthnet = _Net(
            *_conv_bn_relu(cfg.neck_channels + 64, width, 3, bias=bias),
            *_conv_bn_relu(width, width, 3, bias=bias),
            nn.Conv2d(width, self.D + self.C, 1),
        )
        self.downsample = _Net(*_downsample(self.C, cfg.downsample))

    def forward(self, feat: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dtransform(depth)
        return self.split(self.depthnet(torch.cat([d, feat], dim=1)))
