"""The restricted unpickler: hostile pickles are refused by the name of what they call, and
nothing in them runs, whatever the pickle protocol or torch.save format."""

from __future__ import annotations

import builtins
import os
import pathlib
import pickle
import subprocess

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
