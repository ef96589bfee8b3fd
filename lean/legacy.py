"""CUDA-BEVFusion's PTQ checkpoint: a whole pickled model, read without running any of it.

``bevfusion_ptq.pth`` is ``torch.save(model)`` of an ``MMDataParallel`` around the quantized
BEVFusion model, so the file names classes from mmcv, mmdet3d, pytorch-quantization, spconv and
CUDA-BEVFusion's own ``lean`` package (none of which this project installs), and unpickling it
the ordinary way would import and run them. Here a restricted unpickler reads it instead:

- classes from those packages become inert placeholders that only record what the pickle gives
  them (constructor arguments, ``__setstate__`` state, items); nothing is imported;
- tensors are rebuilt by our own functions from the archive's raw storages, whatever device
  they were saved from, and only for the camera branch;
- any other global (``os.system``, ``builtins.eval``, ...) stops the read at once, before the
  pickle can call it, with an error naming it.

The camera branch's parameters, buffers and quantizer amax are then renamed from
pytorch-quantization's names to ours (``map_legacy_state_dict``, shared with state-dict
checkpoints that carry ``*_amax`` keys).
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from lean.checkpoint import Checkpoint
from lean.errors import LeanError

# Packages whose classes a CUDA-BEVFusion model pickle names. Any class under them may become a
# placeholder: placeholders never import or run the real thing, so the list only has to cover
# what such files hold, not what is safe to run. ``lean.quantize``/``lean.funcs`` are
# CUDA-BEVFusion's qat/lean modules (helper forwards, QuantConcat, SparseConvolutionQunat), not ours.
PLACEHOLDER_PACKAGES = (
    "mmcv", "mmdet", "mmdet3d", "pytorch_quantization", "spconv", "cumm", "torchpack", "addict",
    "numpy", "torch.nn", "lean.quantize", "lean.funcs",
)
# Plain containers a pickle may build by calling their type; calling them runs no user code.
_PLAIN_TYPES = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "list"): list,
    ("builtins", "tuple"): tuple, ("builtins", "dict"): dict, ("builtins", "bytearray"): bytearray,
    ("builtins", "slice"): slice, ("builtins", "object"): object, ("collections", "OrderedDict"): OrderedDict,
}
_STORAGE_DTYPES = {
    "ByteStorage": torch.uint8, "CharStorage": torch.int8, "ShortStorage": torch.int16, "IntStorage": torch.int32,
    "LongStorage": torch.int64, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's pre-1.6 (non-zip) format starts with it
LEGACY_PROTOCOL = 1001
MAX_DEPTH = 64  # module nesting; real models are about 10 deep


class Placeholder:
    """Stands in for a class a pickle names: records what the pickle hands it, runs nothing."""

    __slots__ = ("_args", "_kwargs", "_state", "_items", "_list")
    pickle_name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self._args, self._kwargs = args, kwargs
        self._state, self._items, self._list = {}, {}, []
        return self

    def __init__(self, *args, **kwargs):
        pass  # __new__ already recorded the arguments

    def __setstate__(self, state):
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:
            if isinstance(part, dict):
                self._state.update(part)
            elif part is not None:
                self._state.setdefault("__state__", part)

    # dict, list and set subclasses (ConfigDict, ...) get their items through these.
    def __setitem__(self, key, value):
        self._items[key] = value

    def append(self, value):
        self._list.append(value)

    def extend(self, values):
        self._list.extend(values)

    def add(self, value):
        self._list.append(value)

    def __repr__(self):
        return f"<placeholder {self.pickle_name}>"


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        raise pickle.UnpicklingError("state applied to a storage type")


class _StorageRef:
    """A storage of the archive (or a view into one), read only if a camera tensor uses it."""

    __slots__ = ("key", "dtype", "start", "numel")

    def __init__(self, key, dtype, start, numel):
        self.key, self.dtype, self.start, self.numel = key, dtype, start, numel

    def __setstate__(self, state):
        raise pickle.UnpicklingError("state applied to a storage")


class _TensorRef:
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError("tensor without a storage record")
        if not (isinstance(offset, int) and offset >= 0 and _ints(size) and _ints(stride) and len(size) == len(stride)):
            raise pickle.UnpicklingError("tensor with a malformed shape")
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("state applied to a tensor")


def _ints(values) -> bool:
    return isinstance(values, (tuple, list, torch.Size)) and all(isinstance(v, int) and v >= 0 for v in values)


# -- what a pickle may call ---------------------------------------------------------------------
# Each of these stands for a torch/copyreg/codecs function of the same name; ours only record.
def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("parameter without a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _TENSOR_REBUILDS or new_type not in (_TENSOR, _PARAMETER):
        raise pickle.UnpicklingError("tensor subclass rebuilt by an unexpected function")
    return func(*args)


def _encode(text, encoding="utf-8"):
    # Protocol 2 writes bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode with unexpected arguments")
    return text.encode("latin1")


def _newobj(cls, *args):
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)):
        raise _Refused(f"copyreg.__newobj__ of {_name_of(cls)}")
    return cls.__new__(cls, *args)


def _newobj_ex(cls, args, kwargs):
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)) or not isinstance(kwargs, dict):
        raise _Refused(f"copyreg.__newobj_ex__ of {_name_of(cls)}")
    return cls.__new__(cls, *args, **kwargs)


def _reconstructor(cls, base, state):
    # Protocol 0/1 object construction: only a placeholder on a plain base is plain construction.
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)) or base not in _PLAIN_TYPES.values():
        raise _Refused(f"copyreg._reconstructor({_name_of(cls)}, {_name_of(base)})")
    return cls.__new__(cls, state)


def _torch_size(values=()):
    if not _ints(values):
        raise pickle.UnpicklingError("torch.Size of non-integers")
    return torch.Size(values)


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise pickle.UnpicklingError("torch.device with unexpected arguments")
    return torch.device(kind) if index is None else torch.device(kind, index)


class _Allowed:
    """What a pickle gets for an allowed function name: ours, and immune to BUILD.

    A pickle can apply state to any object it holds; on a plain function that would let it set
    ``__defaults__`` and the like, poisoning later loads in the same process.
    """

    __slots__ = ("fn", "name")

    def __init__(self, fn, name):
        self.fn, self.name = fn, name

    def __call__(self, *args, **kwargs):
        if self.fn is None:
            raise pickle.UnpicklingError(f"{self.name} called")
        return self.fn(*args, **kwargs)

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"state applied to {self.name}")


def _allowed(table: dict) -> dict:
    return {(m, n): _Allowed(fn, f"{m}.{n}") for (m, n), fn in table.items()}


_FUNCTIONS = _allowed({
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("_codecs", "encode"): _encode,
    ("copyreg", "__newobj__"): _newobj,
    ("copyreg", "__newobj_ex__"): _newobj_ex,
    ("copyreg", "_reconstructor"): _reconstructor,
    # Only as the type argument of _rebuild_from_type_v2; calling them is refused.
    ("torch", "Tensor"): None,
    ("torch._tensor", "Tensor"): None,
    ("torch.nn.parameter", "Parameter"): None,
})
_TENSOR_REBUILDS = tuple(_FUNCTIONS[("torch._utils", n)] for n in (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"))
_TENSOR, _PARAMETER = _FUNCTIONS[("torch._tensor", "Tensor")], _FUNCTIONS[("torch.nn.parameter", "Parameter")]
_FUNCTIONS[("torch", "Tensor")] = _TENSOR


class _Refused(Exception):
    def __init__(self, what):
        super().__init__(what)
        self.what = what


def _name_of(obj) -> str:
    if isinstance(obj, type) and issubclass(obj, Placeholder):
        return obj.pickle_name
    return getattr(obj, "__qualname__", type(obj).__name__)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, reader: "_Archive", legacy: bool = False):
        super().__init__(file)
        self.reader = reader
        self.legacy = legacy

    def find_class(self, module, name):
        # Protocol 2 writes Python 2 names (``__builtin__.set``); read them as the stock unpickler does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _FUNCTIONS:
            return _FUNCTIONS[key]
        if key in _PLAIN_TYPES:
            return _PLAIN_TYPES[key]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if _placeholder_allowed(module, name):
            return self.reader.placeholder(module, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError("malformed persistent id")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and self.legacy and len(pid) == 4:
            return pid[1]  # pre-1.6 files record each module class's source; the class is all we keep
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        if self.legacy and len(pid) == 6:
            _, storage_type, key, _location, numel, view = pid
        elif not self.legacy and len(pid) == 5:
            (_, storage_type, key, _location, numel), view = pid, None
        else:
            raise pickle.UnpicklingError("malformed storage record")
        # The location ("cuda:0", ...) is ignored: every tensor is rebuilt on the CPU.
        return self.reader.storage(storage_type, key, numel, view)


def _placeholder_allowed(module: str, name: str) -> bool:
    if not any(module == p or module.startswith(p + ".") for p in PLACEHOLDER_PACKAGES):
        return False
    parts = module.split(".") + name.split(".")
    # A class, not a member of one: ``Conv2d.__init__`` or ``__builtins__`` would not be a
    # plain object construction when the pickle calls it.
    return all(p.isidentifier() and not p.startswith("__") for p in parts)


class _Archive:
    """One checkpoint file: its pickle(s), placeholders, and storages read on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.classes: dict[tuple[str, str], type] = {}
        self.storages: dict[str, _StorageRef] = {}
        self.big_endian = False
        self._zip = None
        self._prefix = ""
        self._file = None
        self._legacy_offsets: dict[str, tuple[int, int]] = {}
        self._bytes: dict[str, bytes] = {}

    def placeholder(self, module: str, name: str) -> type:
        key = (module, name)
        if key not in self.classes:
            attrs = {"__slots__": (), "__module__": module, "__qualname__": name, "pickle_name": f"{module}.{name}"}
            self.classes[key] = type(name.rsplit(".", 1)[-1], (Placeholder,), attrs)
        return self.classes[key]

    def storage(self, storage_type, key, numel, view) -> _StorageRef:
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(numel, int)
                and numel >= 0):
            raise pickle.UnpicklingError("malformed storage record")
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _StorageRef(key, storage_type.dtype, 0, numel)
        if view is None:
            return root
        _view_key, offset, size = view
        if not (isinstance(offset, int) and isinstance(size, int) and 0 <= offset and 0 <= size <= root.numel - offset):
            raise pickle.UnpicklingError("storage view out of range")
        return _StorageRef(key, root.dtype, offset, size)

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
        return _Unpickler(io.BytesIO(self._zip.read(pickles[0])), self).load()

    def _load_stream(self):
        self._file = open(self.path, "rb")
        first = _Unpickler(self._file, self).load()
        if first != LEGACY_MAGIC:
            return first  # a plain pickle: the object itself
        if _Unpickler(self._file, self).load() != LEGACY_PROTOCOL:
            raise LeanError(f"{self.path} is an old torch.save file of unknown version: re-save it with PyTorch >= 1.6")
        sys_info = _Unpickler(self._file, self).load()
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            self.big_endian = True
        root = _Unpickler(self._file, self, legacy=True).load()
        keys = _Unpickler(self._file, self).load()
        if not isinstance(keys, list):
            raise pickle.UnpicklingError("malformed storage list")
        # The raw storages follow in that order, each an int64 element count and the data.
        for key in keys:
            ref = self.storages.get(key)
            head = self._file.read(8)
            if ref is None or len(head) != 8:
                raise pickle.UnpicklingError("storage data does not match the storage list")
            (count,) = struct.unpack(">q" if self.big_endian else "<q", head)
            self._legacy_offsets[key] = (self._file.tell(), count)
            self._file.seek(count * _element_size(ref.dtype), io.SEEK_CUR)
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
                self._bytes[key] = self._file.read(count * _element_size(self.storages[key].dtype))
        return self._bytes[key]

    def tensor(self, ref: _TensorRef) -> torch.Tensor:
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
        return torch.as_strided(flat, ref.size, ref.stride, ref.offset).clone()

    def close(self):
        for handle in (self._zip, self._file):
            if handle is not None:
                handle.close()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- the camera branch of the pickled model -----------------------------------------------------
def read_pickled_model(path) -> Checkpoint:
    """A whole pickled BEVFusion model (CUDA-BEVFusion's ``bevfusion_ptq.pth``) -> its camera branch."""
    path = Path(path)
    archive = _Archive(path)
    try:
        try:
            root = archive.load()
        except _Refused as e:
            raise LeanError(
                f"{path} refers to {e.what}, which is not among what a model checkpoint may use: refused to load it "
                "(nothing in the file was run); if you trust the file, re-save its weights as a state dict with "
                "torch.save(model.state_dict(), path)"
            ) from None
        except LeanError:
            raise
        except Exception as e:  # anything else the bytes can provoke is a damaged file
            text = f"{path} is not a readable pickled model ({_first_line(e)}): pass a .pth checkpoint"
            raise LeanError(text) from None
        if isinstance(root, dict):
            return _from_dict(root, archive)
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
    meta = {"legacy": {"quantizers": len(quantizers), "shared": sum(len(n) > 1 for n, _ in quantizers)}}
    return map_legacy_state_dict(sd, source="cuda-bevfusion-pickle", disabled=disabled, meta=meta)


def _from_dict(root: dict, archive: _Archive) -> Checkpoint:
    """A checkpoint dict whose extras (numpy, mmcv config) kept torch's safe loader away."""
    from lean.checkpoint import checkpoint_from_object

    def tensors(d):
        return {k: archive.tensor(v) for k, v in d.items() if isinstance(k, str) and isinstance(v, _TensorRef)}

    obj = {"state_dict": tensors(root["state_dict"])} if isinstance(root.get("state_dict"), dict) else tensors(root)
    return checkpoint_from_object(obj, str(archive.path))


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
    refs: dict[str, _TensorRef] = {}
    groups: dict[int, tuple[list[str], bool]] = {}

    def walk(node, prefix, path):
        if len(path) > MAX_DEPTH:
            raise LeanError(f"{name}: the camera branch nests deeper than {MAX_DEPTH} modules: the file is damaged")
        state = _state(node)
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for table, hidden in (("_parameters", ()), ("_buffers", skip)):
            entries = state.get(table)
            if isinstance(entries, dict):
                for key, ref in entries.items():
                    if isinstance(key, str) and isinstance(ref, _TensorRef) and key not in hidden:
                        refs[prefix + key] = ref
        if type(node).pickle_name.endswith("TensorQuantizer"):
            names, _ = groups.get(id(node), ([], False))
            names.append(prefix[:-1])
            groups[id(node)] = (names, state.get("_disabled") is True)
        mods = state.get("_modules")
        for key, child in (mods.items() if isinstance(mods, dict) else ()):
            if isinstance(key, str) and isinstance(child, Placeholder):
                if id(child) in path:
                    raise LeanError(f"{name}: the camera branch contains itself: the file is damaged")
                walk(child, f"{prefix}{key}.", path | {id(child)})

    walk(camera, "", {id(camera)})
    return refs, list(groups.values())


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
