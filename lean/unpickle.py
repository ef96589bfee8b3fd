"""A restricted unpickler: reads what a pickle holds without running any of it.

Used for CUDA-BEVFusion's PTQ checkpoint (``lean.pickled``), a whole pickled model whose file
names classes from mmcv, mmdet3d, pytorch-quantization, spconv and CUDA-BEVFusion's own ``lean``
package, and for mmengine checkpoints (mmdetection3d 1.x, AWML), whose message hub holds
mmengine ``HistoryBuffer`` objects with numpy arrays (none of which this project installs);
unpickling them the ordinary way would import and run them. Here:

- classes from those packages become inert placeholders that only record what the pickle gives
  them (constructor arguments, ``__setstate__`` state, items); nothing is imported;
- tensors become records (``TensorRef``) of their storage, offset, size and stride, rebuilt
  later by the archive reader from raw bytes, whatever device they were saved from;
- any other global (``os.system``, ``builtins.eval``, ...) stops the read at once, before the
  pickle can call it, with ``Refused`` naming it.

This file is the security boundary: everything a pickle may call is listed here.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from collections import OrderedDict

import torch

# Packages whose classes a CUDA-BEVFusion model pickle or an mmengine checkpoint names. Any class
# under them may become a placeholder: placeholders never import or run the real thing (a numpy
# array stays a record of its bytes), so the list only has to cover what such files hold, not
# what is safe to run. ``lean.quantize``/``lean.funcs`` are
# CUDA-BEVFusion's qat/lean modules (helper forwards, QuantConcat, SparseConvolutionQunat), not ours.
PLACEHOLDER_PACKAGES = (
    "mmcv", "mmdet", "mmdet3d", "mmengine", "pytorch_quantization", "spconv", "cumm", "torchpack", "addict",
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


class StorageRef:
    """A storage of the archive (or a view into one), read only if a camera tensor uses it."""

    __slots__ = ("key", "dtype", "start", "numel")

    def __init__(self, key, dtype, start, numel):
        self.key, self.dtype, self.start, self.numel = key, dtype, start, numel

    def __setstate__(self, state):
        raise pickle.UnpicklingError("state applied to a storage")


class TensorRef:
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, StorageRef):
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
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
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
        raise Refused(f"copyreg.__newobj__ of {_name_of(cls)}")
    return cls.__new__(cls, *args)


def _newobj_ex(cls, args, kwargs):
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)) or not isinstance(kwargs, dict):
        raise Refused(f"copyreg.__newobj_ex__ of {_name_of(cls)}")
    return cls.__new__(cls, *args, **kwargs)


def _reconstructor(cls, base, state):
    # Protocol 0/1 object construction: only a placeholder on a plain base is plain construction.
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)) or base not in _PLAIN_TYPES.values():
        raise Refused(f"copyreg._reconstructor({_name_of(cls)}, {_name_of(base)})")
    return cls.__new__(cls, state)


class MemberRef:
    """What ``getattr(placeholder class, name)`` gives a pickle: a record of the name, never the member.

    mmengine pickles a HistoryBuffer's statistics methods as ``getattr(HistoryBuffer, "min")``."""

    __slots__ = ("owner", "name")

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __setstate__(self, state):
        raise pickle.UnpicklingError("state applied to a member reference")


def _getattr(obj, name, *default):
    if not (isinstance(obj, type) and issubclass(obj, Placeholder) and isinstance(name, str) and name.isidentifier()
            and not name.startswith("__") and not default):
        raise Refused(f"builtins.getattr({_name_of(obj)}, {name!r})")
    return MemberRef(obj.pickle_name, name)


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
    ("builtins", "getattr"): _getattr,
    # Only as the type argument of _rebuild_from_type_v2; calling them is refused.
    ("torch", "Tensor"): None,
    ("torch._tensor", "Tensor"): None,
    ("torch.nn.parameter", "Parameter"): None,
})
_TENSOR_REBUILDS = tuple(_FUNCTIONS[("torch._utils", n)] for n in (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"))
_TENSOR, _PARAMETER = _FUNCTIONS[("torch._tensor", "Tensor")], _FUNCTIONS[("torch.nn.parameter", "Parameter")]
_FUNCTIONS[("torch", "Tensor")] = _TENSOR


class Refused(Exception):
    def __init__(self, what):
        super().__init__(what)
        self.what = what


def _name_of(obj) -> str:
    if isinstance(obj, type) and issubclass(obj, Placeholder):
        return obj.pickle_name
    return getattr(obj, "__qualname__", type(obj).__name__)


class Unpickler(pickle._Unpickler):  # noqa: SLF001
    """The pure-Python unpickler: its memo is a dict, where the C one grows an array to twice the
    largest index a PUT names (a 9-byte file could make it allocate gigabytes)."""

    def __init__(self, file, records: Records, legacy: bool = False):
        super().__init__(file)
        self.records = records
        self.legacy = legacy
        self.after_getattr = False  # the global fetched last was builtins.getattr

    def find_class(self, module, name):
        # Protocol 2 writes Python 2 names (``__builtin__.set``); read them as the stock unpickler does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        after_getattr, self.after_getattr = self.after_getattr, key == ("builtins", "getattr")
        if key in _FUNCTIONS:
            return _FUNCTIONS[key]
        if key in _PLAIN_TYPES:
            return _PLAIN_TYPES[key]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if _placeholder_allowed(module, name):
            return self.records.placeholder(module, name)
        # Protocol 2 reaches a method as getattr(class, name): name the getattr the pickle set up.
        raise Refused(f"{module}.{name} (fetched for builtins.getattr)" if after_getattr else f"{module}.{name}")

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
        return self.records.storage(storage_type, key, numel, view)


def _placeholder_allowed(module: str, name: str) -> bool:
    if not any(module == p or module.startswith(p + ".") for p in PLACEHOLDER_PACKAGES):
        return False
    parts = module.split(".") + name.split(".")
    # A class, not a member of one: ``Conv2d.__init__`` or ``__builtins__`` would not be a
    # plain object construction when the pickle calls it.
    return all(p.isidentifier() and not p.startswith("__") for p in parts)


class Records:
    """What the pickles of one file have named so far: placeholder classes and storages."""

    def __init__(self):
        self.classes: dict[tuple[str, str], type] = {}
        self.storages: dict[str, StorageRef] = {}

    def placeholder(self, module: str, name: str) -> type:
        key = (module, name)
        if key not in self.classes:
            attrs = {"__slots__": (), "__module__": module, "__qualname__": name, "pickle_name": f"{module}.{name}"}
            self.classes[key] = type(name.rsplit(".", 1)[-1], (Placeholder,), attrs)
        return self.classes[key]

    def storage(self, storage_type, key, numel, view) -> StorageRef:
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(numel, int)
                and numel >= 0):
            raise pickle.UnpicklingError("malformed storage record")
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = StorageRef(key, storage_type.dtype, 0, numel)
        if view is None:
            return root
        _view_key, offset, size = view
        if not (isinstance(offset, int) and isinstance(size, int) and 0 <= offset and 0 <= size <= root.numel - offset):
            raise pickle.UnpicklingError("storage view out of range")
        return StorageRef(key, root.dtype, offset, size)
