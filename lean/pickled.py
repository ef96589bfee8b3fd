"""CUDA-BEVFusion's PTQ checkpoint: a whole pickled model, read without running any of it.

``bevfusion_ptq.pth`` is ``torch.save(model)`` of an ``MMDataParallel`` around the quantized
BEVFusion model. The archive (zip, or torch's pre-1.6 stream) is read here: its pickles go
through the restricted unpickler (``lean.unpickle``), tensors are rebuilt from the raw storages
on the CPU, and only for the camera branch, which is found by walking the recorded modules.
What comes back is plain data; ``lean.checkpoint`` renames it to our keys.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lean.errors import LeanError, first_line
from lean.unpickle import Placeholder, Records, Refused, TensorRef, Unpickler

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's pre-1.6 (non-zip) format starts with it
LEGACY_PROTOCOL = 1001
MAX_DEPTH = 64  # module nesting; real models are about 10 deep
# Module names the walk may produce. Shared modules appear under each of their names (as in a state
# dict), so a file whose modules share children level after level would name 2^depth paths; the
# camera branch of a real model has a few thousand.
MAX_VISITS = 100_000


@dataclass
class PickledModel:
    """The camera branch of a pickled model: tensors under pytorch-quantization's names."""

    tensors: dict[str, torch.Tensor]
    disabled: list[str] = field(default_factory=list)  # quantizers the model had switched off
    quantizers: int = 0
    shared: int = 0  # quantizers reachable under more than one name


class _Archive:
    """One checkpoint file: its pickle(s), and the storages they name, read on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.records = Records()
        self.big_endian = False
        self._zip = None
        self._prefix = ""
        self._file = None
        self._legacy_offsets: dict[str, tuple[int, int]] = {}
        self._bytes: dict[str, bytes] = {}

    # -- reading ------------------------------------------------------------------------------
    def load(self):
        if zipfile.is_zipfile(self.path):
            return self._load_zip()
        return self._load_stream()

    def _load_zip(self):
        self._zip = zipfile.ZipFile(self.path)
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise LeanError(f"{self.path} is a zip archive but not a torch.save file (no data.pkl): pass a .pth file")
        self._prefix = pickles[0][: -len("data.pkl")]
        order = self._prefix + "byteorder"
        if order in self._zip.namelist():
            self.big_endian = self._zip.read(order).strip() == b"big"
        return Unpickler(io.BytesIO(self._zip.read(pickles[0])), self.records).load()

    def _load_stream(self):
        self._file = open(self.path, "rb")
        first = Unpickler(self._file, self.records).load()
        if first != LEGACY_MAGIC:
            return first  # a plain pickle: the object itself
        if Unpickler(self._file, self.records).load() != LEGACY_PROTOCOL:
            raise LeanError(f"{self.path} is an old torch.save file of unknown version: re-save it with PyTorch >= 1.6")
        sys_info = Unpickler(self._file, self.records).load()
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            self.big_endian = True
        root = Unpickler(self._file, self.records, legacy=True).load()
        keys = Unpickler(self._file, self.records).load()
        if not isinstance(keys, list):
            raise pickle.UnpicklingError("malformed storage list")
        # The raw storages follow in that order, each an int64 element count and the data.
        for key in keys:
            ref = self.records.storages.get(key)
            head = self._file.read(8)
            if ref is None or len(head) != 8:
                raise pickle.UnpicklingError("storage data does not match the storage list")
            (count,) = struct.unpack(">q" if self.big_endian else "<q", head)
            start, size = self._file.tell(), count * _element_size(ref.dtype)
            if count < 0 or start + size > self.path.stat().st_size:
                raise LeanError(f"{self.path}: storage {key} declares {count} elements, more than the file holds: "
                                "the file is truncated, damaged or hostile")
            self._legacy_offsets[key] = (start, count)
            self._file.seek(size, io.SEEK_CUR)
        return root

    def _raw(self, key: str) -> bytes:
        if key not in self._bytes:
            if self._zip is not None:
                name = f"{self._prefix}data/{key}"
                if name not in self._zip.NameToInfo:
                    raise LeanError(f"{self.path} lacks the data of storage {key}: the file is truncated or damaged")
                self._bytes[key] = self._zip.read(name)
            else:
                offset, count = self._legacy_offsets.get(key, (None, 0))
                if offset is None:
                    raise LeanError(f"{self.path} lacks the data of storage {key}: the file is truncated or damaged")
                self._file.seek(offset)
                self._bytes[key] = self._file.read(count * _element_size(self.records.storages[key].dtype))
        return self._bytes[key]

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        st = ref.storage
        size = _element_size(st.dtype)
        raw = self._raw(st.key)
        if len(raw) < (st.start + st.numel) * size:
            raise LeanError(f"{self.path}: storage {st.key} is shorter than its tensors: the file is truncated")
        data = bytearray(raw[st.start * size : (st.start + st.numel) * size])
        flat = torch.frombuffer(data, dtype=st.dtype) if data else torch.empty(0, dtype=st.dtype)
        if self.big_endian and size > 1:
            flat = flat.view(torch.uint8).reshape(-1, size).flip(1).contiguous().view(st.dtype).flatten()
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) if all(ref.size) else -1
        if last >= st.numel:
            raise LeanError(f"{self.path}: a tensor reaches past the end of storage {st.key}: the file is damaged")
        if math.prod(ref.size) > st.numel:  # a stride-0 or overlapping view: its copy could be any size
            raise LeanError(f"{self.path}: a tensor declares {list(ref.size)} over a storage of {st.numel} elements: "
                            "the file is damaged or hostile")
        return torch.as_strided(flat, ref.size, ref.stride, ref.offset).clone()

    def close(self):
        for handle in (self._zip, self._file):
            if handle is not None:
                handle.close()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- the camera branch of the pickled model -----------------------------------------------------
def read_pickled_model(path, containers: tuple[str, ...] = ("state_dict",)) -> PickledModel | dict:
    """A whole pickled BEVFusion model (CUDA-BEVFusion's ``bevfusion_ptq.pth``) -> its camera branch.

    A pickled checkpoint dict (one whose extras kept torch's safe loader away: numpy, an mmcv
    config, mmengine's message hub) comes back as a dict of its tensors, or as
    ``{container: tensors}`` for the first of ``containers`` it holds (the optimizer state and
    the like are never read).
    """
    path = Path(path)
    archive = _Archive(path)
    try:
        try:
            root = archive.load()
        except Refused as e:
            raise LeanError(
                f"{path} refers to {e.what}, which is not among what a model checkpoint may use: refused to load it "
                "(nothing in the file was run); if you trust the file, re-save its weights as a state dict with "
                "torch.save(model.state_dict(), path)"
            ) from None
        except LeanError:
            raise
        except Exception as e:  # anything else the bytes can provoke is a damaged file
            text = f"{path} is not a readable pickled model ({first_line(e)}): pass a .pth checkpoint"
            raise LeanError(text) from None
        if isinstance(root, dict):
            return _from_dict(root, archive, containers)
        camera = _find_camera(root)
        if camera is None:
            what = root.pickle_name if isinstance(root, Placeholder) else type(root).__name__
            raise LeanError(
                f"{path} holds a pickled {what} without a camera branch (no encoders.camera module): "
                "pass a camera+lidar BEVFusion model such as CUDA-BEVFusion's bevfusion_ptq.pth"
            )
        refs, quantizers = _camera_tensors(camera, str(path))
        tensors: dict[int, torch.Tensor] = {}
        sd = {}
        for key, ref in refs.items():
            if id(ref) not in tensors:
                tensors[id(ref)] = archive.tensor(ref)
            sd[key] = tensors[id(ref)]
    finally:
        archive.close()
    disabled = [name for names, off in quantizers for name in names if off]
    return PickledModel(sd, disabled, len(quantizers), sum(len(n) > 1 for n, _ in quantizers))


def _from_dict(root: dict, archive: _Archive, containers: tuple[str, ...]) -> dict:
    def tensors(d):
        return {k: archive.tensor(v) for k, v in d.items() if isinstance(k, str) and isinstance(v, TensorRef)}

    for key in containers:
        if isinstance(root.get(key), dict):
            return {key: tensors(root[key])}
    return tensors(root)


def _state(obj) -> dict:
    return obj._state if isinstance(obj, Placeholder) else {}


def _child(obj, name):
    mods = _state(obj).get("_modules")
    child = mods.get(name) if isinstance(mods, dict) else None
    return child if isinstance(child, Placeholder) else None


def _find_camera(root):
    """``MMDataParallel.module`` -> BEVFusion -> ``encoders`` -> ``camera``, wrappers optional."""
    node = root
    for _ in range(4):  # (Distributed)DataParallel wrappers, possibly nested
        inner = _child(node, "module")
        if inner is None:
            break
        node = inner
    if all(_child(node, n) is not None for n in ("backbone", "neck", "vtransform")):
        return node  # the camera branch itself was pickled
    encoders = _child(node, "encoders")
    return _child(encoders, "camera") if encoders is not None else None


def _camera_tensors(camera, name: str):
    """Every parameter and persistent buffer under every module name (shared modules appear under
    each of theirs, as in a state dict), and each quantizer's names and whether it is disabled."""
    refs: dict[str, TensorRef] = {}
    groups: dict[int, tuple[list[str], bool]] = {}

    tables: dict[int, tuple] = {}  # each module's own tensors and children, read once however often it is shared
    visits = 0

    def table(node):
        if id(node) not in tables:
            state = _state(node)
            skip = state.get("_non_persistent_buffers_set")
            skip = skip if isinstance(skip, (set, frozenset)) else set()
            own = []
            for entries, hidden in ((state.get("_parameters"), ()), (state.get("_buffers"), skip)):
                if isinstance(entries, dict):
                    own += [(k, r) for k, r in entries.items()
                            if isinstance(k, str) and isinstance(r, TensorRef) and k not in hidden]
            mods = state.get("_modules")
            children = [(k, c) for k, c in (mods.items() if isinstance(mods, dict) else ())
                        if isinstance(k, str) and isinstance(c, Placeholder)]
            quantizer = type(node).pickle_name.endswith("TensorQuantizer")
            tables[id(node)] = own, children, quantizer, state.get("_disabled") is True
        return tables[id(node)]

    def walk(node, prefix, path):
        nonlocal visits
        own, children, quantizer, disabled = table(node)
        visits += 1 + len(own)  # names produced, not just modules visited
        if visits > MAX_VISITS:
            raise LeanError(f"{name}: the camera branch names more than {MAX_VISITS} modules (modules shared level "
                            "after level): the file is damaged or hostile")
        if len(path) > MAX_DEPTH:
            raise LeanError(f"{name}: the camera branch nests deeper than {MAX_DEPTH} modules: the file is damaged")
        for key, ref in own:
            refs[prefix + key] = ref
        if quantizer:
            names, _ = groups.get(id(node), ([], False))
            names.append(prefix[:-1])
            groups[id(node)] = (names, disabled)
        for key, child in children:
            if id(child) in path:
                raise LeanError(f"{name}: the camera branch contains itself: the file is damaged")
            walk(child, f"{prefix}{key}.", path | {id(child)})

    walk(camera, "", {id(camera)})
    return refs, list(groups.values())

