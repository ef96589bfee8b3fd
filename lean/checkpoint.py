"""Checkpoint reading and writing.

Accepted inputs, all read with ``torch.load(weights_only=True)`` (nothing in a file can run code):
- an official BEVFusion training checkpoint: ``{"state_dict": {"encoders.camera.*": ..., "encoders.lidar.*": ...}}``;
- a bare state dict with the same keys (with or without the ``encoders.camera.`` prefix);
- the project's own format (float or PTQ), which adds the config and metadata;
- CUDA-BEVFusion's pickled whole model, through the restricted reader (``lean.pickled``).

State dicts with pytorch-quantization names (``*._input_quantizer._amax``; CUDA-BEVFusion's)
are renamed to ours here (``map_legacy_state_dict``), whichever way they were read.
"""

from __future__ import annotations

import functools
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lean.config import CameraConfig
from lean.errors import LeanError, first_line
from lean.io import atomic_path, sha256
from lean.pickled import PickledModel, read_pickled_model

PREFIX = "encoders.camera."
FORMAT = "lean.camera"
FORMAT_VERSION = 1
DEMO_NOTE = "UNTRAINED DEMO WEIGHTS: deterministic random init with BN statistics from the example data"


@dataclass
class Checkpoint:
    """Camera-branch tensors of a checkpoint, keys without the ``encoders.camera.`` prefix."""

    state_dict: dict[str, torch.Tensor]
    kind: str  # "float" (BN layers present) or "ptq" (BN folded, quantizer amax present)
    source: str  # where it came from: lean-float, lean-ptq, official, state-dict, cuda-bevfusion-pickle
    path: Path | None = None
    config: CameraConfig | None = None  # stored config, if the file has one
    meta: dict = field(default_factory=dict)
    # Quantizers the source disabled (legacy pickles), by our name; exported without Q/DQ.
    disabled_quantizers: tuple[str, ...] = ()

    @functools.cached_property
    def sha256(self) -> str | None:
        return sha256(self.path) if self.path else None


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise LeanError(f"checkpoint {path} does not exist: check the path, or run `make model` for the demo ones")
    if not path.is_file():
        raise LeanError(f"checkpoint {path} is not a file: pass the .pth file itself")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Not a plain state dict: a whole pickled model (CUDA-BEVFusion's bevfusion_ptq.pth) or
        # something hostile. The restricted reader takes the first and refuses the second by name.
        obj = read_pickled_model(path)
    except Exception as e:  # noqa: BLE001 - torch.load raises anything from IndexError to EOFError on junk
        raise LeanError(f"{path} is not a PyTorch checkpoint or is truncated ({first_line(e)})") from None
    if isinstance(obj, PickledModel):
        meta = {"legacy": {"quantizers": obj.quantizers, "shared": obj.shared}}
        ckpt = map_legacy_state_dict(obj.tensors, source="cuda-bevfusion-pickle", disabled=obj.disabled, meta=meta)
    else:
        ckpt = checkpoint_from_object(obj, str(path))
    ckpt.path = path
    return ckpt


def checkpoint_from_object(obj, name: str) -> Checkpoint:
    """Classify what ``torch.load`` returned and pull out the camera branch."""
    if not isinstance(obj, dict):
        raise LeanError(f"{name} holds a {type(obj).__name__}, not a checkpoint dict: pass a state-dict checkpoint")
    if obj.get("format") == FORMAT:
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise LeanError(f"{name} was written by a newer lean (format {obj['format_version']}): upgrade lean")
        sd = camera_tensors(obj["state_dict"], name)
        kind = obj.get("kind", "float")
        return Checkpoint(sd, kind, f"lean-{kind}", config=CameraConfig.from_dict(obj["config"]), meta=obj.get("meta", {}))
    if isinstance(obj.get("state_dict"), dict):
        sd = camera_tensors(obj["state_dict"], name)
        source = "official"
    else:
        sd = camera_tensors(obj, name)
        source = "state-dict"
    if any(k.endswith("_amax") for k in sd):
        return map_legacy_state_dict(sd, source=f"cuda-bevfusion-{source}")
    return Checkpoint(sd, "float", source, meta=obj.get("meta", {}) if isinstance(obj.get("meta"), dict) else {})


def camera_tensors(sd: dict, name: str) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if any(k.startswith(PREFIX) for k in tensors):
        out = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    else:
        # A bare camera state dict; everything else (lidar, fuser, heads) is not ours.
        out = {k: v for k, v in tensors.items() if k.split(".")[0] in ("backbone", "neck", "vtransform")}
    if not out:
        sample = ", ".join(list(map(str, sd))[:3]) or "nothing"
        raise LeanError(
            f"{name} has no camera-branch weights (no 'encoders.camera.*' keys; first keys: {sample}): "
            "pass a BEVFusion checkpoint"
        )
    return out


def infer_config(sd: dict[str, torch.Tensor], cameras: int = 6) -> CameraConfig:
    """Recover the branch's config from tensors official checkpoints carry.

    The frustum stores (u, v, depth) of every feature pixel: its last u and v are W-1 and H-1 of
    the training image, and its depth axis is the dbound. dx/bx/nx give the BEV bounds.
    """
    backbone = "swint" if "backbone.patch_embed.projection.weight" in sd else "resnet50"
    cfg = {"backbone": backbone, "cameras": cameras}
    fr = sd.get("vtransform.frustum")
    if fr is not None and fr.dim() == 4 and fr.shape[-1] == 3 and fr.shape[0] > 1:
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
    head = sd.get("vtransform.depthnet.6.weight")
    if head is not None and fr is not None:
        cfg["bev_channels"] = head.shape[0] - fr.shape[0]
    return CameraConfig(**cfg)


def _r(x: float) -> float:
    return round(x, 4)  # the file stores float32; configs are given to 4 decimals


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Strict load with a one-line error naming the first offenders and the likely cause."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        raise LeanError(f"{what} does not fit the model: {describe_mismatch(missing, unexpected, shape, sd, own)}")
    model.load_state_dict(sd, strict=True)


def describe_mismatch(missing, unexpected, shape, sd, own) -> str:
    parts = []
    if shape:
        k = shape[0]
        parts.append(
            f"{len(shape)} mis-shaped (first: {k} is {tuple(sd[k].shape)}, model wants {tuple(own[k].shape)})"
        )
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    text = "; ".join(parts)
    if "vtransform.frustum" in shape:
        text += " -- the frustum follows the image size: pass the --image-size it was trained at, or --rebuild-frustum"
    elif any(k.startswith("backbone.") for k in missing[:3] + unexpected[:3]):
        text += " -- is it the other backbone? try --backbone resnet50 or --backbone swint"
    elif any("bn" in k or k.endswith("running_mean") for k in missing[:3]) and any(k.endswith("bias") for k in unexpected[:3]):
        text += " -- BN looks folded: this is a PTQ checkpoint"
    return text


def save_checkpoint(path, state_dict: dict, kind: str, config: CameraConfig, meta: dict | None = None) -> None:
    """The project's own format: official key names plus config and metadata, weights_only-loadable."""
    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config.to_dict(),
        "state_dict": {PREFIX + k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "meta": meta or {},
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_official(path, state_dict: dict, meta: dict | None = None) -> None:
    """A float checkpoint in the official training layout (``state_dict`` with full key names)."""
    obj = {"state_dict": {PREFIX + k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, "meta": meta or {}}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)



# -- pytorch-quantization names -> ours ---------------------------------------------------------
_CONCAT = re.compile(r"(.*\.)?quant_concat(\d+)\._input_quantizer")
_NECK_CONCAT_AMAX = re.compile(r"neck\.quant_concat(\d+)\._input_quantizer\._amax")


def map_legacy_state_dict(sd: dict[str, torch.Tensor], source: str = "cuda-bevfusion-state-dict",
                          disabled=(), meta: dict | None = None) -> Checkpoint:
    """Camera tensors with pytorch-quantization names (prefix already stripped) -> our PTQ layout.

    ``X._input_quantizer._amax`` -> ``X.input_quantizer._amax``, ``X._weight_quantizer._amax`` ->
    ``X.weight_quantizer._amax``, ``neck.quant_concatJ._input_quantizer._amax`` -> ``neck.quant_concatI._amax``
    (see ``concat_levels``), residual quantizers and weights unchanged. Amax of quantizers the source
    disabled is dropped and their names go to ``disabled_quantizers``; other quantizer internals
    (clip values, ...) are dropped, everything else is kept for the strict weight load to judge.
    """
    levels = concat_levels(sd)
    off = {quantizer_name(q, levels) for q in disabled}
    out = {}
    for key, value in sd.items():
        if key.endswith("._amax"):
            ours = quantizer_name(key[: -len("._amax")], levels)
            if ours not in off:
                out[ours + "._amax"] = value
        elif not any(p.endswith("_quantizer") or re.fullmatch(r"quant_concat\d+", p) for p in key.split(".")[:-1]):
            out[key] = value
    kind = "ptq" if any(k.endswith("._amax") for k in out) or off else "float"
    return Checkpoint(out, kind, source, meta=meta or {}, disabled_quantizers=tuple(sorted(off)))


def quantizer_name(name: str, levels: dict[int, int] | None = None) -> str:
    """Our name of a pytorch-quantization quantizer path."""
    m = _CONCAT.fullmatch(name)
    if m:
        j = int(m.group(2))
        return f"{m.group(1) or ''}quant_concat{(levels or {}).get(j, j)}"
    for theirs, ours in (("._input_quantizer", ".input_quantizer"), ("._weight_quantizer", ".weight_quantizer")):
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    return name


def concat_levels(sd: dict[str, torch.Tensor]) -> dict[int, int]:
    """Their concat index -> the neck level it serves (our index).

    CUDA-BEVFusion's patched neck forward walks the levels top-down and numbers the concats in
    that order: ``quant_concat0`` serves the top level, ours serve level i. The concat of a level
    shares its quantizer with that level's lateral conv input, so equal amax identifies the
    level; without that evidence the top-down numbering is assumed.
    """
    amax = {int(m.group(1)): value for key, value in sd.items() if (m := _NECK_CONCAT_AMAX.fullmatch(key))}
    n = len(amax)
    top_down = {j: n - 1 - j for j in amax}
    found = {}
    for j, value in amax.items():
        hits = [i for i in range(n)
                if _same(sd.get(f"neck.lateral_convs.{i}.conv._input_quantizer._amax"), value)]
        found[j] = hits[0] if len(hits) == 1 else None
    if n and None not in found.values() and sorted(found.values()) == sorted(top_down.values()):
        return found
    return top_down


def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
