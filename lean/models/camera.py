"""The camera branch as the exporter sees it: backbone -> neck -> depth/feature head, plus the
BEV downsample. Module names match ``encoders.camera.*`` of official checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from lean.config import CameraConfig
from lean.models.neck import GeneralizedLSSFPN
from lean.models.resnet import resnet50
from lean.models.swin import swint
from lean.models.vtransform import AWMLDepthLSSTransform, DepthLSSTransform, LSSTransform

BACKBONE_BUILDERS = {"resnet50": resnet50, "swint": swint}
VTRANSFORM_BUILDERS = {"depth_lss": DepthLSSTransform, "lss": LSSTransform, "awml": AWMLDepthLSSTransform,
                       "awml_lss": LSSTransform}


def build_backbone(cfg: CameraConfig) -> nn.Module:
    return BACKBONE_BUILDERS[cfg.backbone]()


class CameraBranch(nn.Module):
    def __init__(self, cfg: CameraConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.neck = GeneralizedLSSFPN(cfg.backbone_channels, cfg.neck_channels)
        self.vtransform = VTRANSFORM_BUILDERS[cfg.vtransform](cfg)

    def forward(self, img: torch.Tensor, depth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B,N,3,H,W], depth [B,N,1,H,W] (None for camera-only variants) ->
        camera_feature [B*N,fH,fW,C], depth weights [B*N,D,fH,fW]."""
        b, n, c, h, w = img.shape
        feat = self.neck(self.backbone(img.reshape(b * n, c, h, w)))
        if not self.vtransform.uses_depth:
            return self.vtransform(feat)
        if depth is None:
            raise ValueError(f"the {self.cfg.vtransform} view transform needs the depth image")
        return self.vtransform(feat, depth.reshape(b * n, 1, h, w))

    def bev_downsample(self, bev: torch.Tensor) -> torch.Tensor:
        """Pooled camera BEV [B,C,X,Y] -> [B,C,X/2,Y/2]."""
        return self.vtransform.downsample(bev)


class BackboneGraph(nn.Module):
    """What ``camera.backbone.onnx`` holds: the branch up to the BEV pooling."""

    def __init__(self, branch: CameraBranch):
        super().__init__()
        self.branch = branch

    def forward(self, img, depth=None):
        return self.branch(img, depth)


class VTransformGraph(nn.Module):
    """What ``camera.vtransform.onnx`` holds: the BEV downsample after the pooling."""

    def __init__(self, branch: CameraBranch):
        super().__init__()
        self.downsample = branch.vtransform.downsample

    def forward(self, feat_in):
        return self.downsample(feat_in)


def build_camera(cfg: CameraConfig | None = None) -> CameraBranch:
    return CameraBranch(cfg or CameraConfig()).eval()
