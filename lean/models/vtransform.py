"""DepthLSSTransform: the learned half of BEVFusion's camera-to-BEV view transform.

The two halves the exporter needs live here: per-camera depth distribution and features
(``forward``), and the BEV ``downsample``. Geometry and pooling between them are runtime work
(``lean.geometry``).
"""

from __future__ import annotations

import torch
from torch import nn

from lean.config import CameraConfig
from lean.geometry import create_frustum, voxel_grid


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, bias: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(True)]


class DepthLSSTransform(nn.Module):
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
        self.dtransform = nn.Sequential(
            *_conv_bn_relu(1, 8, 1), *_conv_bn_relu(8, 32, 5, stride=4), *_conv_bn_relu(32, 64, 5, stride=2)
        )
        cin = cfg.neck_channels + 64
        self.depthnet = nn.Sequential(
            *_conv_bn_relu(cin, cfg.neck_channels, 3),
            *_conv_bn_relu(cfg.neck_channels, cfg.neck_channels, 3),
            nn.Conv2d(cfg.neck_channels, self.D + self.C, 1),
        )
        c = self.C
        stride = cfg.downsample
        self.downsample = nn.Sequential(
            *_conv_bn_relu(c, c, 3, bias=False),
            *_conv_bn_relu(c, c, 3, stride=stride, bias=False),
            *_conv_bn_relu(c, c, 3, bias=False),
        )

    def forward(self, feat: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feat [B*N, 256, fH, fW], depth image [B*N, 1, H, W] -> (features NHWC, depth weights)."""
        d = self.dtransform(depth)
        x = self.depthnet(torch.cat([d, feat], dim=1))  # depth channels come first, as trained
        weights = x[:, : self.D].softmax(dim=1)
        # NHWC so the C channels of a pixel are contiguous for the runtime's BEV-pool kernel.
        features = x[:, self.D : self.D + self.C].permute(0, 2, 3, 1)
        return features, weights
