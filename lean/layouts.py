"""The trainers' layouts of the camera branch: which keys are the branch in each trainer's state
dict (MIT bevfusion, mmdetection3d 1.x / AWML, OpenPCDet, bare), the config its tensors imply, and
loading them into our model by our names, with mismatches spelled as the file spells them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lean.config import CameraConfig
from lean.errors import LeanError

PREFIX = "encoders.camera."  # MIT bevfusion's camera branch inside the whole model


@dataclass(frozen=True)
class Layout:
    """How one trainer names the camera branch in its state dict."""

    name: str  # the checkpoint's ``source_format``
    title: str
    prefixes: tuple[tuple[str, str], ...]  # (theirs, ours) for backbone, neck, view transform

    def describe(self) -> str:
        return f"{self.title} ({', '.join(theirs + '*' for theirs, _ in self.prefixes)})"


def _layout(name, title, backbone, neck, vtransform) -> Layout:
    return Layout(name, title, ((backbone, "backbone."), (neck, "neck."), (vtransform, "vtransform.")))


# In the order they are tried: OpenPCDet's ``neck.`` and ``vtransform.`` are also the bare names.
LAYOUTS = (
    _layout("mit", "MIT bevfusion", PREFIX + "backbone.", PREFIX + "neck.", PREFIX + "vtransform."),
    _layout("mmdet3d", "mmdetection3d 1.x / AWML", "img_backbone.", "img_neck.", "view_transform."),
    _layout("mmdet3d", "mmdetection3d 1.x (older projects/BEVFusion)", "img_backbone.", "img_neck.", "vtransform."),
    _layout("openpcdet", "OpenPCDet", "image_backbone.", "neck.", "vtransform."),
    _layout("state-dict", "bare camera state dict", "backbone.", "neck.", "vtransform."),
)
# Where trainers keep the weights inside the file: MIT/mmengine ``state_dict``, OpenPCDet ``model_state``.
CONTAINERS = ("state_dict", "model_state", "model")


def camera_tensors(sd: dict, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The camera branch of a trainer's state dict under our names, and the layout it was found in.

    The layout is detected from the key prefixes (``LAYOUTS``); AWML is told from mmdetection3d
    by its view transform's ``.net`` Sequentials. Everything else (lidar, fuser, heads) is dropped.
    """
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for wrapper in ("module.", "model."):  # saved from a DataParallel wrapper, or a Lightning module's self.model
        if tensors and all(k.startswith(wrapper) for k in tensors):
            tensors = {k[len(wrapper):]: v for k, v in tensors.items()}
            sd = tensors
    for layout in LAYOUTS:
        out = {}
        for theirs, ours in layout.prefixes:
            out.update({ours + k[len(theirs):]: v for k, v in tensors.items() if k.startswith(theirs)})
        if any(k.startswith("backbone.") for k in out) and any(k.startswith("vtransform.") for k in out):
            source = layout.name
            if source == "mmdet3d" and any(k.startswith("vtransform.downsample.net.") for k in out):
                source = "awml"
            return out, source
    raise LeanError(f"{name} holds no camera branch in a known layout: key prefixes of its weights: "
                    f"{_prefixes(list(sd))}; layouts known: {'; '.join(l.describe() for l in LAYOUTS)}")


def _prefixes(keys: list) -> str:
    seen = []
    for k in keys:
        parts = str(k).split(".")
        p = ".".join(parts[:2]) + "." if parts[0] == "encoders" and len(parts) > 2 else (
            parts[0] + "." if len(parts) > 1 else parts[0])
        if p not in seen:
            seen.append(p)
    shown = ", ".join(seen[:8]) or "none"
    return shown + (f" (+{len(seen) - 8} more)" if len(seen) > 8 else "")


def infer_config(sd: dict[str, torch.Tensor], cameras: int = 6) -> CameraConfig:
    """Recover the branch's config from the tensors trainers' checkpoints carry.

    The backbone and view-transform variant follow from which keys exist; widths from the conv
    shapes. The frustum stores (u, v, depth) of every feature pixel: its last u and v are W-1
    and H-1 of the training image, and its depth axis is the dbound. dx/bx/nx give the BEV bounds.
    """
    cfg = {"backbone": _backbone(sd), "cameras": cameras, "vtransform": _vtransform(sd)}
    _check_geometry(sd)
    fr = sd.get("vtransform.frustum")
    if fr is not None and fr.shape[0] > 1:
        cfg["image_size"] = (round(fr[0, -1, 0, 1].item()) + 1, round(fr[0, 0, -1, 0].item()) + 1)
        lo, step = fr[0, 0, 0, 2].item(), fr[1, 0, 0, 2].item() - fr[0, 0, 0, 2].item()
        cfg["dbound"] = (_r(lo), _r(lo + fr.shape[0] * step), _r(step))
        if fr.shape[1] > 0:
            cfg["feature_stride"] = max(1, round(cfg["image_size"][0] / fr.shape[1]))
    if all(f"vtransform.{k}" in sd for k in ("dx", "bx", "nx")):
        dx, bx, nx = (sd[f"vtransform.{k}"].tolist() for k in ("dx", "bx", "nx"))
        bounds = [(_r(b - d / 2), _r(b - d / 2 + n * d), _r(d)) for d, b, n in zip(dx, bx, nx)]
        cfg.update(xbound=bounds[0], ybound=bounds[1], zbound=bounds[2])
    if "neck.fpn_convs.0.conv.weight" in sd:
        cfg["neck_channels"] = sd["neck.fpn_convs.0.conv.weight"].shape[0]
    first, last = _DEPTHNET[cfg["vtransform"]]
    if first and first + "weight" in sd:
        width = sd[first + "weight"].shape[0]
        if width != CameraConfig(**cfg).depthnet_width:
            cfg["depthnet_channels"] = width
    if cfg["vtransform"] == "awml":
        cfg["depthnet_bias"] = first + "bias" in sd
        cfg["dtransform_bias"] = "vtransform.dtransform.net.0.bias" in sd
    head = sd.get(last + "weight")
    if head is not None and fr is not None:
        cfg["bev_channels"] = head.shape[0] - fr.shape[0]
    return CameraConfig(**cfg)


def _check_geometry(sd) -> None:
    for key, shape in (("dx", "[3]"), ("bx", "[3]"), ("nx", "[3]"), ("frustum", "[D, fH, fW, 3]")):
        t = sd.get(f"vtransform.{key}")
        ok = t is None or (t.shape == (3,) if key != "frustum" else t.dim() == 4 and t.shape[-1] == 3 and t.numel() > 0)
        if not ok:
            raise LeanError(f"checkpoint's vtransform.{key} has shape {list(t.shape)}, expected {shape}: the file is "
                            "damaged or not a BEVFusion camera branch")


# The depthnet's first (hidden) and last conv of each view-transform variant.
_DEPTHNET = {"depth_lss": ("vtransform.depthnet.0.", "vtransform.depthnet.6."),
             "awml": ("vtransform.depthnet.net.0.", "vtransform.depthnet.net.6."),
             "lss": (None, "vtransform.depthnet."), "awml_lss": (None, "vtransform.depthnet.")}


def _backbone(sd) -> str:
    if "backbone.patch_embed.projection.weight" in sd:
        return "swint"
    if "backbone.layer1.0.conv1.weight" in sd and "backbone.layer1.0.conv3.weight" not in sd:
        raise LeanError("the checkpoint's backbone is a ResNet of basic blocks (ResNet18/34): this tool builds "
                        "ResNet50 and SwinT camera backbones")
    return "resnet50"


def _vtransform(sd) -> str:
    if not any(k.startswith("vtransform.downsample.") for k in sd):
        # MIT and AWML build an Identity for downsample 1; CUDA-BEVFusion's runtime expects the 2x.
        raise LeanError("the checkpoint's view transform has no downsample (trained with downsample=1): "
                        "CUDA-BEVFusion's camera.vtransform.onnx is the 2x BEV downsample, so this branch cannot fill it")
    awml = any(k.startswith("vtransform.downsample.net.") for k in sd)
    if "vtransform.depthnet.weight" in sd:
        return "awml_lss" if awml else "lss"  # one 1x1 conv, no dtransform: the camera-only LSSTransform
    return "awml" if awml else "depth_lss"


def _r(x: float) -> float:
    return round(x, 4)  # the file stores float32; configs are given to 4 decimals


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint",
                 source: str | None = None) -> None:
    """Strict load with a one-line error naming the first offenders (as a file of ``source``'s layout
    spells them) and the likely cause."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        raise LeanError(f"{what} does not fit the model: "
                        f"{describe_mismatch(missing, unexpected, shape, sd, own, source)}")
    model.load_state_dict(sd, strict=True)


def spelled(key: str, source: str | None) -> str:
    """Our key as a checkpoint of ``source`` (a ``Checkpoint.source``) spells it."""
    name = (source or "").removeprefix("cuda-bevfusion-")
    if name.startswith("lean-"):
        return PREFIX + key
    layout = next((l for l in LAYOUTS if l.name == name), None)
    for theirs, ours in layout.prefixes if layout else ():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def describe_mismatch(missing, unexpected, shape, sd, own, source: str | None = None) -> str:
    parts = []
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} mis-shaped (first: {spelled(k, source)} is {tuple(sd[k].shape)}, model wants "
                     f"{tuple(own[k].shape)})")
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(spelled(k, source) for k in missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(spelled(k, source) for k in unexpected[:3])})")
    text = "; ".join(parts)
    if "vtransform.frustum" in missing:
        text += (f" -- {spelled('vtransform.frustum', source)} is derived from the image size and depth bins: pass "
                 "--rebuild-frustum to derive it")
    elif "vtransform.frustum" in shape:
        text += " -- the frustum follows the image size: pass the --image-size it was trained at, or --rebuild-frustum"
    elif any(k.startswith("backbone.") for k in missing[:3] + unexpected[:3]):
        text += " -- is it the other backbone? try --backbone resnet50 or --backbone swint"
    elif any("bn" in k or k.endswith("running_mean") for k in missing[:3]) and any(k.endswith("bias") for k in unexpected[:3]):
        text += " -- BN looks folded: this is a PTQ checkpoint"
    return text
