"""CUDA-BEVFusion's ``.tensor`` files: the format its runtime reads its example data from.

Layout: little-endian int32 ``[0x33ff1101, ndim, dtype]``, ``ndim`` int32 dims, then the raw
row-major data. Every way a file can be damaged is reported as a one-line ``LeanError``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lean.errors import LeanError
from lean.io import read_regular, write_bytes

MAGIC = 0x33FF1101
CODE_TO_DTYPE = {
    1: np.dtype("<i4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f4"),
    4: np.dtype("<i8"),
    5: np.dtype("<u8"),
    6: np.dtype("<u4"),
    7: np.dtype("i1"),
    8: np.dtype("u1"),
}
DTYPE_TO_CODE = {dt.newbyteorder("="): code for code, dt in CODE_TO_DTYPE.items()}
# Far above anything the runtime stores; a larger value means the header is garbage.
MAX_NDIM = 16
# 2 GiB: a 6-camera rig's matrices are 400 bytes, 10 lidar sweeps about 7 MB.
MAX_BYTES = 1 << 31
_FIX = "regenerate it (python example-data/generate.py) or copy it again from CUDA-BEVFusion's example-data"


def read_tensor(path) -> np.ndarray:
    """The array stored in a ``.tensor`` file, in native byte order and writable."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise LeanError(f"{path}: no such file; check the path or {_FIX}")
    raw = bytearray(read_regular(path, MAX_BYTES, ".tensor file"))

    if len(raw) < 12:
        raise LeanError(f"{path}: {len(raw)} bytes is too short for a .tensor header; {_FIX}")
    magic, ndim, code = np.frombuffer(raw, "<i4", 3)
    if magic != MAGIC:
        raise LeanError(f"{path}: not a .tensor file (magic 0x{int(magic) & 0xFFFFFFFF:08x}, "
                        f"expected 0x{MAGIC:08x}); {_FIX}")
    if not 0 <= ndim <= MAX_NDIM:
        raise LeanError(f"{path}: header says {ndim} dimensions (expected 0..{MAX_NDIM}); {_FIX}")
    if int(code) not in CODE_TO_DTYPE:
        raise LeanError(f"{path}: unknown dtype code {code} (known: 1..8); {_FIX}")
    dtype = CODE_TO_DTYPE[int(code)]

    offset = 12 + 4 * int(ndim)
    if len(raw) < offset:
        raise LeanError(f"{path}: truncated inside the header ({len(raw)} bytes); {_FIX}")
    dims = tuple(int(d) for d in np.frombuffer(raw, "<i4", int(ndim), 12))
    if any(d < 0 for d in dims):
        raise LeanError(f"{path}: negative dimension in shape {list(dims)}; {_FIX}")
    if math.prod(max(d, 1) for d in dims) * dtype.itemsize > MAX_BYTES:  # even an empty array of it is unrepresentable
        raise LeanError(f"{path}: shape {list(dims)} is larger than a .tensor file may hold; {_FIX}")
    expected = offset + math.prod(dims) * dtype.itemsize  # Python ints: 16 dims of 2^31 overflow int64
    if len(raw) < expected:
        raise LeanError(f"{path}: truncated: shape {list(dims)} {dtype.name} needs {expected} bytes, "
                        f"the file has {len(raw)}; {_FIX}")
    if len(raw) > expected:
        raise LeanError(f"{path}: {len(raw) - expected} trailing bytes after the data of shape "
                        f"{list(dims)} {dtype.name}; {_FIX}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def write_tensor(path, array) -> None:
    """Write ``array`` as a ``.tensor`` file; readers never see a half-written file."""
    array = np.asarray(array)
    code = DTYPE_TO_CODE.get(array.dtype.newbyteorder("="))
    if code is None:
        raise LeanError(f"{path}: dtype {array.dtype} has no .tensor code; cast to one of "
                        f"{', '.join(dt.name for dt in CODE_TO_DTYPE.values())} first")
    if array.ndim > MAX_NDIM:
        raise LeanError(f"{path}: {array.ndim} dimensions is more than .tensor allows ({MAX_NDIM}); reshape it")
    header = np.array([MAGIC, array.ndim, code, *array.shape], "<i4").tobytes()
    data = np.ascontiguousarray(array, CODE_TO_DTYPE[code]).tobytes()
    write_bytes(path, header + data)
