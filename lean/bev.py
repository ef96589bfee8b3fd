"""The runtime's step between the two graphs: backbone outputs -> camera BEV map.

The same function pools PyTorch's backbone outputs (for the vtransform's reference input) and
ONNX Runtime's (for the end-to-end check), so the two chains differ only by the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lean.errors import LeanError
from lean.geometry import bev_pool, frustum_geometry


@dataclass(frozen=True)
class Geometry:
    """The pooling's buffers, kept in their own types: an FP16 model's would lose the grid (0.3 m
    is 0.2998 m in FP16)."""

    frustum: torch.Tensor
    dx: torch.Tensor
    bx: torch.Tensor
    nx: torch.Tensor

    @classmethod
    def of(cls, model_or_vtransform) -> "Geometry":
        return cls(*(t.clone() for t in _buffers(model_or_vtransform)))


def _buffers(model_or_vtransform):
    """frustum, dx, bx, nx of a CameraBranch, its DepthLSSTransform or a Geometry (anything holding them)."""
    vt = getattr(model_or_vtransform, "vtransform", model_or_vtransform)
    try:
        return vt.frustum, vt.dx, vt.bx, vt.nx
    except AttributeError:
        raise LeanError(
            f"{type(model_or_vtransform).__name__} holds no frustum/dx/bx/nx: pass the camera model or its vtransform"
        ) from None


@torch.no_grad()
def pool_to_bev(features_nhwc, depth_weights, sample, model_or_vtransform) -> torch.Tensor:
    """Backbone outputs (torch or numpy, any float dtype) -> pooled camera BEV [1, C, X, Y] float32.

    features_nhwc [B*N, fH, fW, C] and depth_weights [B*N, D, fH, fW] as ``camera.backbone.onnx``
    names them ``camera_feature`` and ``camera_depth_weights``; ``sample`` supplies camera2lidar,
    camera_intrinsics and img_aug_matrix.
    """
    frustum, dx, bx, nx = _buffers(model_or_vtransform)
    rig = (sample.camera2lidar, sample.camera_intrinsics, sample.img_aug_matrix)
    geom = frustum_geometry(frustum, *(m.to(frustum.device) for m in rig))
    device = geom.device
    features = torch.as_tensor(features_nhwc, device=device)
    weights = torch.as_tensor(depth_weights, device=device)
    return bev_pool(geom, weights, features, dx, bx, nx)

