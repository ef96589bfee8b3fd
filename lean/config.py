"""Configuration of the camera branch (one small dataclass) and the project's default paths.

Every shape in the pipeline follows from these numbers (depth bins, feature size, BEV grid), so
a rig with another camera count or image size is a config change, not a code change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from lean.errors import LeanError

# What `make` generates and every command uses when not told otherwise.
DEFAULT_DATA = Path("example-data")
DEMO_FLOAT_CKPT = Path("model/resnet50/bevfusion-det.pth")
DEMO_PTQ_CKPT = Path("model/resnet50int8/bevfusion_ptq.pth")

DEVICES = ("auto", "cpu", "cuda")
BACKBONES = ("resnet50", "swint")
# Channels of the backbone outputs the neck reads (indices 1, 2, 3).
BACKBONE_CHANNELS = {"resnet50": (512, 1024, 2048), "swint": (192, 384, 768)}
# View-transform variants (``lean.models.vtransform``): MIT/mmdetection3d/OpenPCDet's
# DepthLSSTransform, MIT camera-only's LSSTransform (no depth input), tier4 AWML's DepthLSSTransform
# and LSSTransform (their modules wrapped in ``.net``).
VTRANSFORMS = ("depth_lss", "lss", "awml", "awml_lss")
CAMERA_ONLY = ("lss", "awml_lss")


# Hard limits of a request, far beyond real rigs (6-8 cameras, 900x1600 images, 118 bins,
# 360x360 grids); anything larger is a typo and would try to allocate 100+ GB.
MAX_CAMERAS = 64
MAX_IMAGE_SIDE = 8192
MAX_DEPTH_BINS = 1024
MAX_GRID_SIDE = 8192


@dataclass(frozen=True)
class CameraConfig:
    backbone: str = "resnet50"
    image_size: tuple[int, int] = (256, 704)  # H, W of the network input
    cameras: int = 6
    feature_stride: int = 8  # image / feature size, fixed by the neck's output level
    dbound: tuple[float, float, float] = (1.0, 60.0, 0.5)
    xbound: tuple[float, float, float] = (-54.0, 54.0, 0.3)
    ybound: tuple[float, float, float] = (-54.0, 54.0, 0.3)
    zbound: tuple[float, float, float] = (-10.0, 10.0, 20.0)
    neck_channels: int = 256
    bev_channels: int = 80  # C
    downsample: int = 2
    vtransform: str = "depth_lss"
    depthnet_channels: int | None = None  # hidden width of the depthnet; None: the variant's
    # AWML: whether its dtransform / depthnet hidden convs have biases (its versions differ)
    dtransform_bias: bool = True
    depthnet_bias: bool = True

    def __post_init__(self):
        self.validate()

    # -- derived shapes -------------------------------------------------------------------
    @property
    def depth_bins(self) -> int:  # D
        lo, hi, step = self.dbound
        return max(0, math.ceil((hi - lo) / step))  # torch.arange(lo, hi, step)'s length

    @property
    def feature_size(self) -> tuple[int, int]:
        h, w = self.image_size
        return h // self.feature_stride, w // self.feature_stride

    @property
    def bev_grid(self) -> tuple[int, int, int]:  # nx: X, Y, Z voxels
        return tuple(round((b[1] - b[0]) / b[2]) for b in (self.xbound, self.ybound, self.zbound))

    def estimate_bytes(self) -> int:
        """Rough peak memory of exporting this branch (measured: 1.2 GB at 6x256x704, ResNet50):
        backbone activations, the frustum geometry of every camera, the BEV maps, and a base."""
        h, w = self.image_size
        fh, fw = self.feature_size
        x, y, z = self.bev_grid
        activations = self.cameras * h * w * 600
        geometry = self.cameras * self.depth_bins * fh * fw * 3 * 4 * 3
        bev = self.bev_channels * x * y * z * 4 * 8
        return activations + geometry + bev + (600 << 20)

    @property
    def depthnet_width(self) -> int:
        """Hidden width of the depthnet: MIT's keeps the neck's width, AWML's its input's (neck + 64)."""
        if self.depthnet_channels:
            return self.depthnet_channels
        return self.neck_channels + 64 if self.vtransform == "awml" else self.neck_channels

    @property
    def uses_depth(self) -> bool:  # whether the backbone file takes the lidar depth image
        return self.vtransform not in CAMERA_ONLY

    @property
    def variant(self) -> str:
        return f"{self.backbone}+generalized_lss_fpn+{self.vtransform}"

    @property
    def backbone_channels(self) -> tuple[int, int, int]:
        return BACKBONE_CHANNELS[self.backbone]

    def validate(self) -> None:
        # Types and ranges first: a config also comes from files, where anything can stand.
        ints = {"cameras": (1, MAX_CAMERAS), "feature_stride": (8, 8), "neck_channels": (1, 4096),
                "bev_channels": (1, 4096), "downsample": (2, 2), "depthnet_channels": (1, 4096)}
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if name == "depthnet_channels" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                label = "--cameras" if name == "cameras" else name
                raise LeanError(f"{label} {v!r} is not supported: it must be an integer from {lo} to {hi}")
        if not (isinstance(self.image_size, tuple) and len(self.image_size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in self.image_size)):
            raise LeanError(f"image size {self.image_size!r} is not two integers HxW, for example 256x704")
        for name in ("dbound", "xbound", "ybound", "zbound"):
            bound = getattr(self, name)
            if not (isinstance(bound, tuple) and len(bound) == 3
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bound)):
                raise LeanError(f"{name} {bound!r} is not three finite numbers LOW,HIGH,STEP in metres")
            lo, hi, step = bound
            if step <= 0 or hi <= lo or not math.isfinite((hi - lo) / step) or round((hi - lo) / step) < 1:
                raise LeanError(f"{name} {lo},{hi},{step} is empty or has no whole step: need lower < upper, "
                                "step > 0 and at least one step between them")
        if self.backbone not in BACKBONES:
            raise LeanError(f"unknown backbone {self.backbone!r}: choose one of {', '.join(BACKBONES)}")
        if self.vtransform not in VTRANSFORMS:
            raise LeanError(f"unknown view transform {self.vtransform!r}: choose one of {', '.join(VTRANSFORMS)}")
        h, w = self.image_size
        # The depth branch (strides 4 and 2) and the neck's output level must land on the same
        # fH x fW grid as the frustum, which holds only when the stride divides the image.
        s = self.feature_stride
        if h <= 0 or w <= 0 or h % s or w % s:
            raise LeanError(
                f"image size {h}x{w} is not supported: height and width must be positive multiples "
                f"of {s} (for example 256x704 or 384x1056)"
            )
        if self.cameras < 1:
            raise LeanError(f"--cameras must be at least 1, got {self.cameras}")
        for name in ("dbound", "xbound", "ybound", "zbound"):
            lo, hi, step = getattr(self, name)
            if step <= 0 or hi <= lo:
                raise LeanError(f"{name} {lo},{hi},{step} is empty: need lower < upper and step > 0")
        if max(h, w) > MAX_IMAGE_SIDE or self.cameras > MAX_CAMERAS:
            raise LeanError(f"{self.cameras} cameras of {h}x{w} is beyond what this tool builds (at most "
                            f"{MAX_CAMERAS} cameras, {MAX_IMAGE_SIDE} pixels a side): check --image-size and --cameras")
        if self.depth_bins > MAX_DEPTH_BINS or max(self.bev_grid) > MAX_GRID_SIDE:
            raise LeanError(f"{self.depth_bins} depth bins and a {'x'.join(map(str, self.bev_grid))} BEV grid are beyond "
                            f"what this tool builds (at most {MAX_DEPTH_BINS} bins, {MAX_GRID_SIDE} cells a side): "
                            "check the bounds' steps")
        x, y, _ = self.bev_grid
        if x % self.downsample or y % self.downsample:
            raise LeanError(f"BEV grid {x}x{y} is not divisible by downsample {self.downsample}")

    def replace(self, **changes) -> "CameraConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "CameraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LeanError(f"checkpoint config has unknown fields {unknown}: it was written by a newer version")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def parse_image_size(text: str) -> tuple[int, int]:
    """'256x704' -> (256, 704), with a one-line error for anything else."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise LeanError(f"image size {text!r} is not HxW, for example 256x704") from None
    CameraConfig(image_size=(h, w))  # the one-line size error before any work
    return h, w


def parse_bound(text: str, name: str) -> tuple[float, float, float]:
    """'-54,54,0.3' -> (-54.0, 54.0, 0.3), with a one-line error for anything else."""
    try:
        lo, hi, step = (float(v) for v in text.split(","))
    except ValueError:
        raise LeanError(f"--{name} {text!r} is not LOW,HIGH,STEP, for example -54,54,0.3") from None
    if not all(math.isfinite(v) for v in (lo, hi, step)):
        raise LeanError(f"--{name} {text!r} holds a value that is not a finite number; pass LOW,HIGH,STEP in metres")
    if step <= 0 or hi <= lo:
        raise LeanError(f"--{name} {text} is empty: need LOW < HIGH and STEP > 0")
    return lo, hi, step
