"""The float camera branch end to end on a small config with a random model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lean.bev import pool_to_bev
from lean.config import CameraConfig
from lean.data import Sample
from lean.errors import LeanError
from lean.geometry import depth_image
from lean.models import build_camera

CFG = CameraConfig(cameras=2, image_size=(64, 176), xbound=(-54.0, 54.0, 1.2), ybound=(-54.0, 54.0, 1.2))
# Columns: camera right, down, forward axes in the lidar frame, for a camera looking along +x.
FORWARD = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _sample(cfg: CameraConfig = CFG) -> Sample:
    """Front and back camera on a 1600x900 original, resized by 0.11 and cropped to 176x64, and
    lidar points on the ground and on a wall ahead."""
    n = cfg.cameras
    c2l = torch.eye(4).repeat(1, n, 1, 1)
    for i in range(n):
        a = 2 * math.pi * i / n
        yaw = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
        c2l[0, i, :3, :3] = yaw @ FORWARD
        c2l[0, i, :3, 3] = torch.tensor([0.0, 0.0, 1.5])
    k = torch.eye(4).repeat(1, n, 1, 1)
    k[..., 0, 0] = k[..., 1, 1] = 1266.0
    k[..., 0, 2], k[..., 1, 2] = 800.0, 450.0
    aug = torch.tensor([[0.11, 0, 0, 0], [0, 0.11, 0, -35.0], [0, 0, 1, 0], [0, 0, 0, 1]]).repeat(1, n, 1, 1)
    g = torch.Generator().manual_seed(0)
    ground = torch.cat((torch.rand(3000, 2, generator=g) * 100 - 50, torch.zeros(3000, 1)), 1)
    wall = torch.cat((torch.full((500, 1), 20.0), torch.rand(500, 2, generator=g) * 6 - 3), 1)
    xyz = torch.cat((ground, wall))
    return Sample(
        img=torch.randn(1, n, 3, *cfg.image_size, generator=g),
        points=torch.cat((xyz, torch.zeros(len(xyz), 2)), 1),
        camera2lidar=c2l,
        camera_intrinsics=k,
        lidar2image=k @ torch.inverse(c2l),
        img_aug_matrix=aug,
        image_size=cfg.image_size,
        folder=Path("."),
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_camera(CFG).eval()


def test_pool_to_bev_gives_the_downsample_its_input(model):
    sample = _sample()
    x, y, _ = CFG.bev_grid
    assert (x, y) == (90, 90)
    with torch.no_grad():
        depth = depth_image(sample.points, sample.lidar2image, sample.img_aug_matrix, CFG.image_size)
        assert int((depth != 0).sum()) > 100  # the points reach both cameras' depth input
        features, weights = model(sample.img, depth)
        pooled = pool_to_bev(features, weights, sample, model)
        assert pooled.shape == (1, CFG.bev_channels, x, y)
        # Two cameras covering a 60 m depth range fill a good share of the 90x90 grid.
        assert int((pooled.abs().sum(1) != 0).sum()) > 500
        bev = model.bev_downsample(pooled)
        assert bev.shape == (1, CFG.bev_channels, x // 2, y // 2)
        assert bev.dtype == torch.float32 and torch.isfinite(bev).all()
        # The vtransform alone holds the geometry buffers too.
        torch.testing.assert_close(pool_to_bev(features, weights, sample, model.vtransform), pooled, rtol=0, atol=0)


def test_pool_to_bev_reads_onnx_runtime_outputs(model):
    # ONNX Runtime hands back numpy arrays, float16 where the graph has FP16 I/O.
    sample = _sample()
    with torch.no_grad():
        depth = depth_image(sample.points, sample.lidar2image, sample.img_aug_matrix, CFG.image_size)
        features, weights = model(sample.img, depth)
        pooled = pool_to_bev(features, weights, sample, model)
    from_numpy = pool_to_bev(features.half().numpy(), weights.half().numpy(), sample, model)
    assert from_numpy.dtype == torch.float32
    scale = pooled.abs().max()
    torch.testing.assert_close(from_numpy / scale, pooled / scale, rtol=0, atol=5e-3)


def test_pool_to_bev_needs_the_geometry_buffers():
    sample = _sample()
    with pytest.raises(LeanError, match="frustum"):
        pool_to_bev(torch.zeros(2, 8, 22, 80), torch.zeros(2, 118, 8, 22), sample, object())
