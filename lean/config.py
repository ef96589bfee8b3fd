"""Configuration of the camera branch (one small dataclass) and the project's default paths.

Every shape in the pipeline follows from these numbers (depth bins, feature size, BEV grid), so
a rig with another camera count or image size is a config change, not a code change.
"""

from __future__ import annotations

import dataclasses
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
        return len(_arange(lo, hi, step))

    @property
    def feature_size(self) -> tuple[int, int]:
        h, w = self.image_size
        return h // self.feature_stride, w // self.feature_stride

    @property
    def bev_grid(self) -> tuple[int, int, int]:  # nx: X, Y, Z voxels
        return tuple(round((b[1] - b[0]) / b[2]) for b in (self.xbound, self.ybound, self.zbound))

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


def _arange(lo: float, hi: float, step: float) -> list[float]:
    # Same count as torch.arange(lo, hi, step) without importing torch here.
    import math

    return [lo + i * step for i in range(math.ceil((hi - lo) / step))]


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
    if step <= 0 or hi <= lo:
        raise LeanError(f"--{name} {text} is empty: need LOW < HIGH and STEP > 0")
    return lo, hi, step
