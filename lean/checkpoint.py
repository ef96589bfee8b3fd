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
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lean.config import CameraConfig
from lean.errors import LeanError, first_line
from lean.io import atomic_path, sha256
from lean.layouts import CONTAINERS, PREFIX, camera_tensors
from lean.legacy import legacy_state_dict
from lean.pickled import PickledModel, read_pickled_model

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


def map_legacy_state_dict(sd: dict[str, torch.Tensor], source: str = "cuda-bevfusion-state-dict",
                          disabled=(), meta: dict | None = None) -> Checkpoint:
    """A checkpoint of camera tensors with pytorch-quantization names (``lean.legacy``)."""
    state, kind, off = legacy_state_dict(sd, disabled)
    return Checkpoint(state, kind, source, meta=meta or {}, disabled_quantizers=off)
