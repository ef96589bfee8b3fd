"""The restricted unpickler: hostile pickles are refused by the name of what they call, and
nothing in them runs, whatever the pickle protocol or torch.save format."""

from __future__ import annotations

import builtins
import os
import pathlib
import pickle
import struct
import subprocess

import numpy as np
import pytest
import torch

from helpers import one_line
from lean.checkpoint import read_checkpoint
from lean.errors import LeanError


class Payload:
    """Pickles as a call of ``fn(*args)``, as a malicious checkpoint would."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def raw_call(module: str, name: str, *args) -> bytes:
    """A protocol-2 pickle calling ``module.name(*args)``, for names no live object pickles to."""
    body = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple without PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + b"R."


def payloads(marker: pathlib.Path):
    m = str(marker)
    return {
        "os.system": (Payload(os.system, f"touch {m}"), {2: "posix.system", 4: "posix.system"}),
        "eval": (Payload(builtins.eval, f"open({m!r}, 'w').close()"), {2: "builtins.eval", 4: "builtins.eval"}),
        "exec": (Payload(builtins.exec, f"open({m!r}, 'w').close()"), {2: "builtins.exec", 4: "builtins.exec"}),
        "popen": (Payload(subprocess.Popen, ["touch", m]), {2: "subprocess.Popen", 4: "subprocess.Popen"}),
        # Protocol 2 reaches a method through getattr, protocol 4 names it directly.
        "path.touch": (Payload(pathlib.Path.touch, pathlib.Path(m)), {2: "builtins.getattr", 4: "pathlib.Path.touch"}),
        "open": (Payload(builtins.open, m, "w"), {2: "io.open", 4: "io.open"}),
        "nested": ({"state_dict": {"a": 1}, "meta": [Payload(os.system, f"touch {m}")]},
                   {2: "posix.system", 4: "posix.system"}),
    }


@pytest.mark.parametrize("fmt", ["raw2", "raw4", "zip", "old"])
@pytest.mark.parametrize("case", ["os.system", "eval", "exec", "popen", "path.touch", "open", "nested"])
def test_hostile_pickles_are_refused_by_name(tmp_path, case, fmt):
    marker = tmp_path / "MARKER"
    payload, names = payloads(marker)[case]
    path = tmp_path / "evil.pth"
    if fmt.startswith("raw"):
        path.write_bytes(pickle.dumps(payload, protocol=int(fmt[3])))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    text = one_line(e)
    assert names[4 if fmt == "raw4" else 2] in text and "refused" in text
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [
    ("os", "system"),
    ("__builtin__", "eval"),  # Python 2's name, read as builtins.eval
    # Names under the packages whose classes become placeholders, but not classes: a member of
    # one is not a plain object construction.
    ("torch.nn.modules.module", "Module.__init__"),
    ("mmcv.runner", "__builtins__"),
    ("copyreg", "_reconstructor"),
])
def test_hostile_raw_globals_are_refused_by_name(tmp_path, module, name):
    marker = tmp_path / "MARKER"
    if module == "copyreg":
        # A placeholder built on another placeholder base: not plain construction.
        cls = b"cmmcv.Foo\nFoo\n"
        data = b"\x80\x02ccopyreg\n_reconstructor\n" + cls + b"cmmcv.Bar\nBar\n" + b"N\x87R."
        expected = "copyreg._reconstructor(mmcv.Foo.Foo, mmcv.Bar.Bar)"
    else:
        data = raw_call(module, name, f"touch {marker}")
        expected = "builtins.eval" if module == "__builtin__" else f"{module}.{name}"
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    assert expected in one_line(e)
    assert not marker.exists()


# -- hostile files dressed as mmengine checkpoints (mmdetection3d 1.x / AWML) ------------------------
class Call:
    """Pickles as ``fn(*args)`` where ``fn`` is any picklable callable (a placeholder-able name too)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _mmengine_file(path, marker, hub_extra):
    from trainers import mmengine_checkpoint, mmengine_installed

    sd = {"img_backbone.conv1.weight": torch.zeros(2), "view_transform.dx": torch.ones(3)}
    with mmengine_installed():
        torch.save(mmengine_checkpoint(sd, hub_extra), path)


@pytest.mark.parametrize("case", ["os.system", "eval", "popen", "path.touch"])
def test_mmengine_checkpoint_with_a_payload_in_its_message_hub_is_refused(tmp_path, case):
    marker = tmp_path / "MARKER"
    payload, names = payloads(marker)[case]
    path = tmp_path / "epoch_12.pth"
    _mmengine_file(path, marker, {"hook": payload})
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    text = one_line(e)
    # The file already fetched getattr (for HistoryBuffer's methods), so the memo reuses it and
    # the refusal names the class whose method the payload wants.
    assert ("pathlib.Path" if case == "path.touch" else names[2]) in text and "refused" in text
    assert not marker.exists()


def test_mmengine_getattr_reaches_only_names_of_placeholder_classes(tmp_path):
    """getattr is allowed for mmengine's HistoryBuffer methods; on anything real, for a dunder name,
    or with a default, it is refused by name; what it gives cannot be called."""
    marker = tmp_path / "MARKER"
    cases = {
        b"ccollections\nOrderedDict\nX\x08\x00\x00\x00fromkeys\x86R.": "builtins.getattr(OrderedDict, 'fromkeys')",
        b"cmmengine.logging\nBuffer\nX\x08\x00\x00\x00__init__\x86R.": "builtins.getattr(mmengine.logging.Buffer, '__init__')",
        b"cmmengine.logging\nBuffer\nX\x03\x00\x00\x00minN\x87R.": "builtins.getattr(mmengine.logging.Buffer, 'min')",
        b"cos\nsystem\nX\x03\x00\x00\x00minN\x87R.": "os.system (fetched for builtins.getattr)",
    }
    for body, expected in cases.items():
        path = tmp_path / "evil.pkl"
        path.write_bytes(b"\x80\x02c__builtin__\ngetattr\n" + body)
        with pytest.raises(LeanError) as e:
            read_checkpoint(path)
        assert expected in one_line(e), one_line(e)
    # getattr(placeholder, "min")(command): the member reference is a record, not a function.
    command = f"touch {marker}".encode()
    path.write_bytes(b"\x80\x02c__builtin__\ngetattr\ncmmengine.logging\nBuffer\nX\x03\x00\x00\x00min\x86R"
                     + b"X" + struct.pack("<I", len(command)) + command + b"\x85R.")
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    assert "'MemberRef' object is not callable" in one_line(e)
    assert not marker.exists()


def test_mmengine_checkpoint_with_numpy_calls_runs_none_of_them(tmp_path):
    """numpy names are placeholders: a pickle 'calling' numpy.testing's runstring or numpy.load only
    records the call, and the weights still come out."""
    marker = tmp_path / "MARKER"
    import numpy.testing._private.utils as np_utils

    path = tmp_path / "epoch_12.pth"
    _mmengine_file(path, marker, {"a": Call(np_utils.runstring, f"open({str(marker)!r}, 'w').close()", {}),
                                  "b": Call(np.load, str(marker))})
    ckpt = read_checkpoint(path)  # only records of the calls were made
    assert ckpt.source == "mmdet3d" and set(ckpt.state_dict) == {"backbone.conv1.weight", "vtransform.dx"}
    assert not marker.exists()
