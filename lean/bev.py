"""The float camera branch end to end in PyTorch: lidar depth image -> backbone -> BEV pooling
-> BEV downsample, the reference the exported ONNX files (plus the runtime's pooling) must match.

``pool_to_bev`` is the middle step alone, so backbone outputs from ONNX Runtime can be pooled
exactly as the PyTorch ones are.
"""

from __future__ import annotations

import torch

from lean.errors import LeanError
from lean.geometry import bev_pool, depth_image, frustum_geometry


def _buffers(model_or_vtransform):
    """frustum, dx, bx, nx of a CameraBranch or of its DepthLSSTransform (anything holding them)."""
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


@torch.no_grad()
def camera_bev(model, sample) -> torch.Tensor:
    """The float camera branch on one sample -> camera BEV [1, C, X/2, Y/2]."""
    cfg = model.cfg
    img = sample.img
    expected = (cfg.cameras, 3, *cfg.image_size)
    if img.dim() != 5 or tuple(img.shape[1:]) != expected:
        raise LeanError(
            f"sample images have shape {list(img.shape)} but the model expects [1, {cfg.cameras}, 3, "
            f"{cfg.image_size[0]}, {cfg.image_size[1]}]: load the sample with the model's image size and camera count"
        )
    depth = depth_image(sample.points, sample.lidar2image, sample.img_aug_matrix, cfg.image_size)
    features, weights = model(img, depth)
    bev = pool_to_bev(features, weights, sample, model)
    return model.bev_downsample(bev)
