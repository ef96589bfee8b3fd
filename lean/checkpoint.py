"""Checkpoint reading and writing.

Accepted inputs, read with ``torch.load(weights_only=True)`` or, for files holding more than
tensors, the restricted reader (``lean.pickled``); nothing in a file can run code:
- trainers' checkpoints, the layout detected from the key prefixes (``LAYOUTS``): MIT bevfusion
  (``{"state_dict": {"encoders.camera.*": ...}}``), mmdetection3d 1.x and AWML (mmengine files with
  ``img_backbone.*``, ``img_neck.*``, ``view_transform.*``), OpenPCDet (``{"model_state":
  {"image_backbone.*", "neck.*", "vtransform.*"}}``), and bare camera state dicts;
- the project's own format (float or PTQ), which adds the config and metadata;
- CUDA-BEVFusion's pickled whole model.

State dicts with pytorch-quantization names (``*._input_quantizer._amax``; CUDA-BEVFusion's)
are renamed to ours here (``map_legacy_state_dict``), whichever way they were read.
"""

from __future__ import annotations

import functools
import math
import pickle
import re
import zipfile
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
    source: str  # the detected format: a LAYOUTS name (mit, mmdet3d, awml, ...), lean-float/-ptq, cuda-bevfusion-*
    path: Path | None = None
    config: CameraConfig | None = None  # stored config, if the file has one
    meta: dict = field(default_factory=dict)
    # Quantizers the source disabled (legacy pickles), by our name; exported without Q/DQ.
    disabled_quantizers: tuple[str, ...] = ()

    @functools.cached_property
    def sha256(self) -> str | None:
        return sha256(self.path) if self.path else None


def _is_zipfile(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile as e:  # is_zipfile itself raises on a ZIP64 locator naming several disks
        raise LeanError(f"checkpoint {path} is a damaged zip archive ({e}); save it again") from None


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise LeanError(f"checkpoint {path} does not exist: check the path, or run `make model` for the demo ones")
    if not path.is_file():
        raise LeanError(f"checkpoint {path} is not a regular file: pass the .pth file itself")
    if _is_zipfile(path):
        check_archive(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Not a plain state dict: a whole pickled model (CUDA-BEVFusion's bevfusion_ptq.pth), an
            # mmengine file, or something hostile. The restricted reader takes the first two and
            # refuses the last by name.
            obj = read_pickled_model(path, CONTAINERS)
        except Exception as e:  # noqa: BLE001 - torch.load raises anything from IndexError to EOFError on junk
            raise LeanError(f"{path} is not a PyTorch checkpoint or is truncated ({first_line(e)})") from None
    else:
        # torch's pre-1.6 format (OpenPCDet still writes it) or a bare pickle: torch.load would
        # allocate each storage at the size the file declares before reading it; the restricted
        # reader bounds every storage by the bytes the file really has.
        _refuse_non_pickle(path)
        obj = read_pickled_model(path, CONTAINERS)
    if isinstance(obj, PickledModel):
        check_tensors(obj.tensors, str(path))  # before the legacy names are mapped (they compare amax)
        meta = {"legacy": {"quantizers": obj.quantizers, "shared": obj.shared}}
        ckpt = map_legacy_state_dict(obj.tensors, source="cuda-bevfusion-pickle", disabled=obj.disabled, meta=meta)
    else:
        ckpt = checkpoint_from_object(obj, str(path))
    check_tensors(ckpt.state_dict, str(path))
    ckpt.path = path
    return ckpt


def _refuse_non_pickle(path: Path) -> None:
    """A file that is neither a zip nor a pickle (protocol 2+, as torch writes) is refused saying
    what it looks like, before any unpickling."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:1] == b"\x80":
        return
    if not head:
        kind = "an empty file"
    elif head.startswith(b"PK"):
        kind = "a damaged or truncated zip archive (torch's format)"
    elif path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head.lower())):
        kind = "an ONNX model"
    elif _is_text(head):
        kind = "a JSON file" if head.lstrip()[:1] in (b"{", b"[") else "a text file"
    else:
        kind = f"not a pickle or a zip archive (it starts with bytes {head[:4].hex(' ')})"
    raise LeanError(f"checkpoint {path} is {kind}, not a PyTorch checkpoint: pass the .pth file a trainer saved (a state "
                    "dict, an mmengine or OpenPCDet checkpoint, CUDA-BEVFusion's model) or a PTQ file of ours")


def _is_text(head: bytes) -> bool:
    text = head.decode("utf-8", errors="replace")
    return "\ufffd" not in text[:-4] and all(c.isprintable() or c.isspace() for c in text[:-4])


def check_archive(path: Path) -> None:
    """A torch.save zip before anything is allocated from it: every member stored uncompressed
    (torch never compresses, so nothing can inflate past the file's size) and intact (CRC)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            infos = sorted(archive.infolist(), key=lambda i: i.header_offset)
            end = 0
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x61:
                    raise LeanError(f"{path}: archive member {info.filename} is compressed or encrypted, which "
                                    "torch.save never does: the file was altered; re-save it with torch.save")
                # Members must not overlap: overlapping members would let a small file hold many times
                # its size of tensor data.
                if info.header_offset < end:
                    raise LeanError(f"{path}: archive members overlap, which torch.save never writes: the file "
                                    "was altered or is hostile")
                end = info.header_offset + 30 + len(info.filename.encode()) + info.file_size
            if sum(i.file_size for i in infos) > size:
                raise LeanError(f"{path}: its archive members hold more bytes than the file: altered or hostile")
            bad = archive.testzip()
    except LeanError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
        raise LeanError(f"{path} is a damaged zip archive ({first_line(e)}): copy or download it again") from None
    if bad is not None:
        raise LeanError(f"{path}: archive member {bad} fails its CRC check: the file is damaged; copy it again")


# What a camera branch's tensors are: float weights, int64 grid sizes and BN batch counts.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.int8, torch.bool)


def check_tensors(sd: dict[str, torch.Tensor], name: str) -> None:
    """Every camera tensor, before any use: no view larger than its storage (a stride-0 tensor
    declaring 10^10 elements over one would become that many on the first copy), finite floats."""
    for key, t in sd.items():
        if t.layout != torch.strided or t.device.type != "cpu" or t.dtype not in _DTYPES:
            raise LeanError(f"{name}: tensor {key} is a {t.dtype} {t.layout} tensor on {t.device}, which no camera "
                            "weight is: the file is damaged or not a BEVFusion checkpoint")
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise LeanError(f"{name}: tensor {key} declares {list(t.shape)} over a storage of "
                            f"{t.untyped_storage().nbytes()} bytes: the file is damaged or hostile")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LeanError(f"{name}: tensor {key} holds NaN or infinite values: the training diverged or the file "
                            "is damaged; use another checkpoint")


def _own_format(obj: dict, name: str) -> Checkpoint:
    """The project's own file, its structure checked before use."""
    version, kind = obj.get("format_version", 0), obj.get("kind", "float")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LeanError(f"{name} was written by a newer lean (format {version!r}): upgrade lean")
    sd, config, meta = obj.get("state_dict"), obj.get("config"), obj.get("meta", {})
    for what, value in (("state_dict", sd), ("config", config), ("meta", meta)):
        if not isinstance(value, dict):
            raise LeanError(f"{name}: its '{what}' is a {type(value).__name__}, not a dict: the file is damaged; "
                            "re-create it with lean.demo or lean.ptq")
    if kind not in ("float", "ptq"):
        raise LeanError(f"{name}: unknown kind {kind!r} (float or ptq): the file is damaged")
    try:
        cfg = CameraConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise LeanError(f"{name}: its config is malformed ({first_line(e)}): re-create the file") from None
    sd = camera_tensors(sd, name)[0]
    if kind == "ptq" and not any(k.endswith("._amax") for k in sd):
        raise LeanError(f"{name} says it is a PTQ checkpoint but holds no quantizer amax: re-run PTQ "
                        "(`python -m lean.ptq`)")
    return Checkpoint(sd, kind, f"lean-{kind}", config=cfg, meta=plain_meta(meta, name))


def plain_meta(meta, name: str, budget: int = 10_000) -> dict:
    """A file's metadata as plain JSON data (it goes into report.json): string keys, JSON scalars,
    bounded depth and size; anything else is dropped, a cycle or a blow-up is refused."""
    count = 0

    def plain(value, depth):
        nonlocal count
        count += 1
        if count > budget or depth > 16:
            raise LeanError(f"{name}: its metadata is nested too deep or too large: the file is damaged or hostile")
        if isinstance(value, dict):
            return {k: plain(v, depth + 1) for k, v in value.items() if isinstance(k, str)}
        if isinstance(value, (list, tuple)):
            return [plain(v, depth + 1) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value if value is None or isinstance(value, (str, int, float, bool)) else None

    return plain(meta, 0) if isinstance(meta, dict) else {}


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


def checkpoint_from_object(obj, name: str) -> Checkpoint:
    """Classify what ``torch.load`` returned and pull out the camera branch."""
    if not isinstance(obj, dict):
        raise LeanError(f"{name} holds a {type(obj).__name__}, not a checkpoint dict: pass a state-dict checkpoint")
    if obj.get("format") == FORMAT:
        return _own_format(obj, name)
    container = next((k for k in CONTAINERS if isinstance(obj.get(k), dict)), None)
    sd, source = camera_tensors(obj[container] if container else obj, name)
    check_tensors(sd, name)  # before the legacy names are mapped (they compare amax)
    if any(k.endswith("_amax") for k in sd):
        return map_legacy_state_dict(sd, source=f"cuda-bevfusion-{source}")
    meta = plain_meta(obj.get("meta"), name) if source == "mit" else {}
    return Checkpoint(sd, "float", source, meta=meta)


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
    _save(obj, path)


def _save(obj: dict, path) -> None:
    """torch.save through an open file, atomically: the archive's record names never carry the
    temporary file's name (torch names them after the file), so two saves are byte-identical."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError
            raise LeanError(f"cannot write {path}: {first_line(e)}; free space or choose another --out") from None


def save_official(path, state_dict: dict, meta: dict | None = None) -> None:
    """A float checkpoint in the official training layout (``state_dict`` with full key names)."""
    obj = {"state_dict": {PREFIX + k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, "meta": meta or {}}
    _save(obj, path)



# -- pytorch-quantization names -> ours ---------------------------------------------------------
_CONCAT = re.compile(r"(.*\.)?quant_concat(\d{1,4})\._input_quantizer")
_NECK_CONCAT_AMAX = re.compile(r"neck\.quant_concat(\d{1,4})\._input_quantizer\._amax")


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
