"""Calibration frames: what a loader worker (``lean.loader``) hands the calibration, made from an
example-data folder or a planned nuScenes sample."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lean.config import CameraConfig
from lean.data import camera_images, normalize, read_folder
from lean.errors import LeanError
from lean.geometry import depth_image
from lean.nuscenes import SamplePlan, rig_matrices, sample_points

RIG_FIELDS = ("camera2lidar", "camera_intrinsics", "lidar2image", "img_aug_matrix")


@dataclass
class Frame:
    """One calibration sample as a loader worker makes it: the images resized and cropped but
    still uint8 (a quarter of the bytes to copy; ``normalize`` runs on the device), the depth
    image as its drawn pixels only (a few thousand of a million), and the rig (``lean.bev``'s
    ``pool_to_bev`` reads it). Workers hand frames of numpy arrays, which travel through the
    loader's queue by value: no shared-memory file descriptor per tensor, whose hand-over broke
    under 15 workers (BENCHMARKS.md). ``to`` makes them tensors on a device."""

    name: str  # the folder or the nuScenes sample token, for messages
    img: np.ndarray | torch.Tensor  # [1,N,3,H,W] uint8
    depth_shape: tuple[int, ...] | None  # [1,N,1,H,W]; None for a camera-only branch
    depth_index: np.ndarray | torch.Tensor  # flat indices of the drawn pixels, int64
    depth_value: np.ndarray | torch.Tensor  # their depths, float32
    camera2lidar: np.ndarray | torch.Tensor  # [1,N,4,4] each
    camera_intrinsics: np.ndarray | torch.Tensor
    lidar2image: np.ndarray | torch.Tensor
    img_aug_matrix: np.ndarray | torch.Tensor

    def _map(self, fn) -> "Frame":
        return dataclasses.replace(self, **{f: fn(torch.as_tensor(getattr(self, f))) for f in ARRAY_FIELDS})

    def pin_memory(self) -> "Frame":  # called by the DataLoader's pinning thread
        return self._map(torch.Tensor.pin_memory)

    def to(self, device) -> "Frame":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backbone's (img, depth), made where the frame is (call ``to`` first)."""
        img = torch.as_tensor(self.img)
        if self.depth_shape is None:
            return normalize(img), None
        depth = torch.zeros(math.prod(self.depth_shape), dtype=torch.float32, device=img.device)
        depth[torch.as_tensor(self.depth_index)] = torch.as_tensor(self.depth_value)  # no host sync
        return normalize(img), depth.view(self.depth_shape)


ARRAY_FIELDS = ("img", "depth_index", "depth_value", *RIG_FIELDS)


def _frame(name: str, pixels, points, rig: dict, cfg: CameraConfig) -> Frame:
    index, value, shape = np.zeros(0, np.int64), np.zeros(0, np.float32), None
    if cfg.uses_depth:
        depth = depth_image(points, rig["lidar2image"], rig["img_aug_matrix"], cfg.image_size)
        shape = tuple(depth.shape)
        flat = depth.view(-1)
        drawn = flat.nonzero().view(-1)
        index, value = drawn.numpy(), flat[drawn].numpy()
    return Frame(name, pixels.numpy(), shape, index, value, **{f: rig[f].float().numpy() for f in RIG_FIELDS})


def folder_frame(folder, cfg: CameraConfig) -> Frame:
    """An example-data folder as a calibration frame for ``cfg``'s rig."""
    folder, pixels, points, rig = read_folder(folder, cfg.image_size, cfg.cameras, cfg.uses_depth)
    return _frame(str(folder), pixels, points, rig, cfg)


def _nuscenes_cameras(plan: SamplePlan, cameras: int | None) -> int:
    n = len(plan.cameras) if cameras is None else cameras
    if not 1 <= n <= len(plan.cameras):
        raise LeanError(f"asked for {n} cameras but nuScenes has {len(plan.cameras)}; pass --cameras 1 to 6")
    return n


def nuscenes_frame(dataroot, plan: SamplePlan, cfg: CameraConfig) -> Frame:
    """One planned nuScenes sample as a calibration frame: the first ``cfg.cameras`` cameras in
    CUDA-BEVFusion's order, points of the key frame and its sweeps cut to ``cfg``'s grid."""
    n = _nuscenes_cameras(plan, cfg.cameras)
    paths = [Path(dataroot) / c.path for c in plan.cameras[:n]]
    pixels, rig = camera_images(paths, rig_matrices(plan), cfg.image_size)
    points = torch.from_numpy(sample_points(dataroot, plan, cfg.xbound, cfg.ybound)) if cfg.uses_depth else None
    return _frame(plan.token, pixels, points, rig, cfg)
