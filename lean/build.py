"""Checkpoint -> model: the device, the branch's config, and the PyTorch model every stage runs.

Every model here has its BatchNorms folded into the convs, as TensorRT folds them and as the
INT8 scales must see them. ``build_model`` is the one entry for the export; PTQ calibrates a
``build_folded`` float model.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

import lean
from lean.checkpoint import Checkpoint
from lean.layouts import infer_config, load_weights
from lean.config import CameraConfig
from lean.errors import LeanError
from lean.geometry import create_frustum, voxel_grid
from lean.models import build_camera
from lean.quant.qdq import attach_quantizers, split_amax

PRECISIONS = ("fp16", "int8")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LeanError("--device cuda asked for, but this PyTorch sees no CUDA GPU: use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise LeanError(f"unknown device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def resolve_config(ckpt: Checkpoint, backbone=None, image_size=None, cameras=None, rebuild_frustum=False,
                   xbound=None, ybound=None) -> CameraConfig:
    """The checkpoint's own config (stored or inferred), with the user's overrides checked against it.

    Image size and BEV bounds only change derived buffers (frustum, dx/bx/nx), so a change is
    allowed with ``rebuild_frustum``; anything else must match the weights.
    """
    stored = ckpt.config or infer_config(ckpt.state_dict)
    if backbone is not None and backbone != stored.backbone:
        raise LeanError(f"--backbone {backbone} does not match the checkpoint, which holds a {stored.backbone} backbone")
    changes = {"cameras": cameras} if cameras is not None else {}
    derived = {"image_size": image_size, "xbound": xbound, "ybound": ybound}
    for key, value in derived.items():
        if value is None or tuple(value) == tuple(getattr(stored, key)):
            continue
        if not rebuild_frustum:
            have, want = (_fmt(key, v) for v in (getattr(stored, key), value))
            raise LeanError(
                f"checkpoint's {'frustum' if key == 'image_size' else 'BEV grid'} was made for {key} {have}, "
                f"not {want}: pass --rebuild-frustum to derive it for the new rig (it is derived data)"
            )
        changes[key] = tuple(value)
    cfg = stored.replace(**changes)
    check_memory(cfg)
    return cfg


def check_memory(cfg: CameraConfig) -> None:
    """Refuse, before allocating anything, a rig whose export would not fit in this machine's memory."""
    need = cfg.estimate_bytes()
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return  # no way to tell on this platform
    if need > have:
        raise LeanError(f"{cfg.cameras} cameras of {'x'.join(map(str, cfg.image_size))} with a "
                        f"{'x'.join(map(str, cfg.bev_grid[:2]))} BEV grid need about {need / 2**30:.0f} GiB to export, "
                        f"more than this machine's {have / 2**30:.0f} GiB: check --image-size, --cameras and the bounds")


def _fmt(key: str, value) -> str:
    return "x".join(map(str, value)) if key == "image_size" else ",".join(f"{v:g}" for v in value)


def check_precision(ckpt: Checkpoint, precision: str) -> None:
    if precision not in PRECISIONS:
        raise LeanError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and ckpt.kind != "ptq":
        path = Path(ckpt.path or "model.pth")
        ptq = path.with_name(f"{path.stem}_ptq.pth")  # beside the user's file: the demo's PTQ file stays
        raise LeanError(
            f"{path} is a float checkpoint; INT8 needs calibrated scales: run `python -m lean.ptq --ckpt {path} "
            f"--out {ptq} --data YOUR_SAMPLES` (or --nuscenes DATAROOT), then `python export_camera.py --ckpt {ptq}`; "
            "or export FP16 with --fp16"
        )


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d into the Conv2d registered right before it (in place).

    All our modules register a BN directly after the conv it normalizes, and apply it there.
    """
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                _fold_into(conv, bn)
                setattr(parent, bn_name, nn.Identity())
    leftover = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if leftover:
        raise RuntimeError(f"BN without a preceding conv cannot be folded: {leftover[:3]}")
    return model


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale)


def build_folded(cfg: CameraConfig, state_dict: dict[str, torch.Tensor], what: str = "checkpoint",
                 folded: bool = False, source: str | None = None) -> nn.Module:
    """The float camera branch with BN folded, weights loaded strictly.

    ``folded``: the weights are already folded (a PTQ checkpoint's), so the model is folded
    before loading them; otherwise they hold BN layers and are folded after. ``source``: the
    checkpoint's layout, to spell keys in errors as its file does.
    """
    model = build_camera(cfg)
    if folded:
        fold_bn(model)
    load_weights(model, state_dict, what, source)
    return (model if folded else fold_bn(model)).eval()


def build_quantized(cfg: CameraConfig, state_dict: dict[str, torch.Tensor], disabled: Iterable[str] = (),
                    source: str | None = None) -> nn.Module:
    """The INT8 model of a PTQ state dict: folded weights, a Q/DQ wherever the state dict has an amax."""
    weights, amax = split_amax(state_dict)
    return attach_quantizers(build_folded(cfg, weights, "PTQ checkpoint", folded=True, source=source), amax,
                             disabled).eval()


def build_model(ckpt: Checkpoint, cfg: CameraConfig, precision: str, rebuild_frustum: bool = False) -> nn.Module:
    """The model the export traces: INT8 (Q/DQ from the amax) or float, BN folded either way."""
    check_precision(ckpt, precision)
    sd = dict(ckpt.state_dict)
    if rebuild_frustum:
        derived = dict(zip(("dx", "bx", "nx"), voxel_grid(cfg.xbound, cfg.ybound, cfg.zbound)))
        derived["frustum"] = create_frustum(cfg.image_size, cfg.feature_size, cfg.dbound)
        sd.update({f"vtransform.{k}": v for k, v in derived.items()})
    if ckpt.kind == "ptq":
        # FP16 engines need no scales: without the amax, the same build gives the float graph of
        # the same folded weights.
        return build_quantized(cfg, sd if precision == "int8" else split_amax(sd)[0], ckpt.disabled_quantizers,
                               ckpt.source)
    return build_folded(cfg, sd, f"checkpoint {ckpt.path}", source=ckpt.source)


def versions() -> dict[str, str]:
    """Versions of what produced a file, for its report and metadata (read without importing)."""
    out = {"lean": lean.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnx", "onnxscript", "onnx-ir", "onnxruntime", "numpy", "nvidia-modelopt"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    # Plain str: torch's TorchVersion is a str subclass that weights_only loading refuses.
    return {k: str(v) for k, v in out.items()}
