"""The shared command-line behaviour: one-line errors, exit codes, the logger's lines on stderr."""

import warnings

import pytest

from lean import cli
from lean.errors import LeanError
from lean.log import logger


def parser():
    p = cli.new_parser("test", "python -m test")
    cli.add_rig(p)
    cli.add_device(p)
    return p


def run(main, *argv):
    return cli.run(main, parser(), list(argv))


@pytest.mark.parametrize("command", [("export_camera.py",), ("-m", "lean.ptq"), ("-m", "lean.lint"), ("-m", "lean.demo"),
                                     ("-m", "lean.data"), ("-m", "bench")])
def test_usage_hints_name_the_command_as_typed(command):
    from helpers import python

    typed = "python " + " ".join(command)
    r = python(*command, "--bogus")
    assert r.returncode == 2 and r.stderr.strip().endswith(f"(see {typed} --help)"), r.stderr
    assert python(*command, "--help").stdout.startswith(f"usage: {typed} ")


def test_user_error_is_one_line_and_exit_2(capsys):
    def main(args):
        raise LeanError("the checkpoint is wrong: pass another")

    assert run(main) == 2
    err = capsys.readouterr().err
    assert err == "error: the checkpoint is wrong: pass another\n"
    assert run(main, "--verbose") == 2 and "Traceback" in capsys.readouterr().err


def test_os_error_is_a_user_error(capsys):
    def main(args):
        open("/nonexistent/folder/file")

    assert run(main) == 2
    assert capsys.readouterr().err.startswith("error: No such file or directory /nonexistent")


def test_a_bug_shows_its_traceback_and_exit_1(capsys):
    def main(args):
        raise ZeroDivisionError("boom")

    assert run(main) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err


def test_interrupt_is_exit_130(capsys):
    def main(args):
        raise KeyboardInterrupt

    assert run(main) == 130 and "untouched" in capsys.readouterr().err


def test_our_warnings_show_without_verbose_third_party_ones_only_with(capsys, recwarn):
    def main(args):
        logger.info("progress line")
        logger.warning("calibrating without CUDA graphs")
        warnings.warn("some library's notice", FutureWarning)

    assert run(main) == 0
    err = capsys.readouterr().err
    assert "progress line" in err and "warning: calibrating without CUDA graphs" in err
    assert not [w for w in recwarn if "library's notice" in str(w.message)]
    assert run(main, "--verbose") == 0
    assert [w for w in recwarn if "library's notice" in str(w.message)]
    assert not [h for h in logger.handlers if isinstance(h.formatter, cli._Formatter)]  # run() cleans up
    assert logger.propagate


def test_rig_options_are_parsed():
    args = parser().parse_args(["--image-size", "128x352", "--xbound=-30,30,0.2", "--rebuild-frustum"])
    opts = cli.rig_options(args)
    assert opts["image_size"] == (128, 352) and opts["xbound"] == (-30.0, 30.0, 0.2) and opts["ybound"] is None
    assert opts["rebuild_frustum"] and opts["backbone"] is None
    with pytest.raises(LeanError):
        cli.rig_options(parser().parse_args(["--image-size", "huge"]))


# -- the hostile-input matrix: bad inputs through both command lines, as subprocesses -------------
# Each case must end in exit 2 with exactly one stderr line ("error: ..."), no traceback and no
# control character, the earlier outputs byte-identical, no temp or staging file left, within a
# time bound and under a memory cap (RLIMIT_AS) far below what the bombs among them would need.
import io as _io
import os
import pickle
import resource
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

from helpers import ROOT

MEMORY_CAP = 6 << 30  # address space: torch's import needs ~2 GB of it, every bomb here far more
TIME_LIMIT = 120


def _cap():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def cli_run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIME_LIMIT, preexec_fn=_cap)


def _ptq_obj(path):
    return torch.load(path, weights_only=True)


def _resave(obj, path):
    torch.save(obj, path)
    return path


def _edit(src, dst, fn):
    """Our own-format checkpoint ``src`` with ``fn(obj)`` applied, saved as ``dst``."""
    obj = _ptq_obj(src)
    fn(obj)
    return _resave(obj, dst)


def _set(key, value):
    def fn(obj):
        obj["state_dict"]["encoders.camera." + key] = value
    return fn


def _first(obj, suffix):
    return next(k for k in obj["state_dict"] if k.endswith(suffix))


def _corrupt_member(src, dst):
    data = bytearray(Path(src).read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0xFF
    Path(dst).write_bytes(bytes(data))
    return dst


def _deflated(src, dst):
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info.filename))
        prefix = z.namelist()[0].split("/")[0]
        out.writestr(f"{prefix}/data/bomb", bytes(200 << 20))  # 200 MB of zeros in ~200 KB
    return dst


def _shared_dag(dst, levels=60):
    """A few KB of modules whose children are shared level after level: 2^60 paths."""
    mod = types.ModuleType("mmdet3d")  # a placeholder package of the reader; not installed here

    class Node:
        def __init__(self, children):
            self._modules = children
            self._parameters, self._buffers = {}, {}

    Node.__module__, Node.__qualname__ = mod.__name__, "Node"
    mod.Node = Node
    sys.modules[mod.__name__] = mod
    try:
        node = Node({})
        for _ in range(levels):
            node = Node({"a": node, "b": node})
        camera = Node({"backbone": node, "neck": Node({}), "vtransform": Node({})})
        Path(dst).write_bytes(pickle.dumps(Node({"encoders": Node({"camera": camera})}), protocol=2))
    finally:
        del sys.modules[mod.__name__]
    return dst


def _legacy_huge_storage(dst):
    buf = _io.BytesIO()
    torch.save({"state_dict": {"encoders.camera.backbone.conv1.weight": torch.zeros(4)}}, buf,
               _use_new_zipfile_serialization=False)
    data = bytearray(buf.getvalue())
    count = (4).to_bytes(8, "little")
    at = data.rfind(count)
    data[at:at + 8] = (10**12).to_bytes(8, "little")
    Path(dst).write_bytes(bytes(data))
    return dst


def _giant_jpeg(folder):
    from PIL import Image

    buf = _io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = (65000).to_bytes(2, "big") * 2  # height, width
    (folder / "0-FRONT.jpg").write_bytes(bytes(data))


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


def _zero_link(path):
    path.unlink()
    path.symlink_to("/dev/zero")


def _nan_matrix(folder):
    from lean.tensorfile import read_tensor, write_tensor

    m = read_tensor(folder / "lidar2image.tensor")
    m[0, 0, 0, 0] = np.nan
    write_tensor(folder / "lidar2image.tensor", m)


def _dir_image(folder):
    (folder / "0-FRONT.jpg").unlink()
    (folder / "0-FRONT.jpg").mkdir()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _escape_keys(src, dst):
    torch.save({"state_dict": {"\x1b[2J\nerror: all good\x07.weight": torch.zeros(1)}}, dst)
    return dst


def _stride0(dst):
    torch.save({"state_dict": {"encoders.camera.backbone.conv1.weight": torch.zeros(1).expand(100000, 100000),
                               "encoders.camera.vtransform.dx": torch.ones(3)}}, dst)
    return dst


def _stride0_mmengine(dst):
    from trainers import mmengine_checkpoint, mmengine_installed

    with mmengine_installed():
        torch.save(mmengine_checkpoint({"img_backbone.conv1.weight": torch.zeros(1).expand(100000, 100000),
                                        "view_transform.dx": torch.ones(3)}), dst)
    return dst


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _hostile(dst):
    class P:
        def __reduce__(self):
            return os.system, (f"touch {Path(dst).parent / 'PWNED'}",)

    torch.save({"state_dict": P()}, dst)
    return dst


# name: (command, kind of input, builder). Builders get (tmp, ptq, float, data) and return the
# extra arguments; "ckpt" cases add --ckpt themselves.
def _ckpt_case(build):
    return lambda tmp, ptq, fl, data: ["--ckpt", build(tmp, ptq, fl), "--data", data, "--cameras", "2"]


def _data_case(spoil, what="folder"):
    def make(tmp, ptq, fl, data):
        import shutil

        folder = tmp / "data"
        shutil.copytree(data, folder)
        spoil(folder if what == "folder" else folder / what)
        return ["--ckpt", ptq, "--data", folder, "--cameras", "2"]
    return make


def _args(*extra):
    return lambda tmp, ptq, fl, data: ["--ckpt", ptq, "--data", data, "--cameras", "2", *extra]


EXPORT = "export_camera.py"
PTQ = "-m lean.ptq"
MATRIX = {
    "amax-wrong-shape": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", lambda o: o["state_dict"].__setitem__(
        _first(o, "conv1.input_quantizer._amax"), torch.ones(3))))),
    "amax-nan": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", lambda o: o["state_dict"].__setitem__(
        _first(o, "conv1.input_quantizer._amax"), torch.tensor(float("nan")))))),
    "amax-negative": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", lambda o: o["state_dict"].__setitem__(
        _first(o, "conv1.weight_quantizer._amax"), -torch.ones(64, 1, 1, 1))))),
    "dx-wrong-shape": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", _set("vtransform.dx", torch.ones(2))))),
    "frustum-wrong-shape": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", _set("vtransform.frustum",
                                                                                           torch.ones(5, 3))))),
    "frustum-nan": (EXPORT, _ckpt_case(lambda t, p, f: _edit(f, t / "x.pth", lambda o: o["state_dict"][
        "encoders.camera.vtransform.frustum"].fill_(float("nan"))))),
    "own-format-no-state-dict": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", lambda o: o.pop("state_dict")))),
    "own-format-meta-list": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", lambda o: o.__setitem__("meta", [1])))),
    "own-format-config-type": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", lambda o: o["config"].__setitem__(
        "image_size", "abc")))),
    "inf-weights": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", lambda o: o["state_dict"][
        "encoders.camera.backbone.conv1.weight"].fill_(float("inf"))))),
    "ptq-without-amax": (EXPORT, _ckpt_case(lambda t, p, f: _edit(p, t / "x.pth", lambda o: [
        o["state_dict"].pop(k) for k in [k for k in o["state_dict"] if k.endswith("_amax")]]))),
    "zip-crc": (EXPORT, _ckpt_case(lambda t, p, f: _corrupt_member(p, t / "x.pth"))),
    "zip-deflate-bomb": (EXPORT, _ckpt_case(lambda t, p, f: _deflated(p, t / "x.pth"))),
    "stride0-weights-only": (EXPORT, _ckpt_case(lambda t, p, f: _stride0(t / "x.pth"))),
    "stride0-restricted-reader": (EXPORT, _ckpt_case(lambda t, p, f: _stride0_mmengine(t / "x.pth"))),
    "shared-module-dag": (EXPORT, _ckpt_case(lambda t, p, f: _shared_dag(t / "x.pth"))),
    "legacy-huge-storage": (EXPORT, _ckpt_case(lambda t, p, f: _legacy_huge_storage(t / "x.pth"))),
    "truncated-ckpt": (EXPORT, _ckpt_case(lambda t, p, f: _write(t / "x.pth", Path(p).read_bytes()[:5000]))),
    "pickle-memo-bomb": (EXPORT, _ckpt_case(lambda t, p, f: _write(t / "x.pth", b"\x80\x02Nr\xff\xff\xff\xff."))),
    "hostile-pickle": (EXPORT, _ckpt_case(lambda t, p, f: _hostile(t / "x.pth"))),
    "ckpt-is-fifo": (EXPORT, _ckpt_case(lambda t, p, f: os.mkfifo(t / "x.pth") or t / "x.pth")),
    "control-chars-in-keys": (EXPORT, _ckpt_case(lambda t, p, f: _escape_keys(p, t / "x.pth"))),
    "newline-in-path": (EXPORT, _ckpt_case(lambda t, p, f: t / "a\nerror: fake\x1b[0m.pth")),
    "jpeg-65000-square": (EXPORT, _data_case(_giant_jpeg)),
    "points-dev-zero": (EXPORT, _data_case(_zero_link, "points.tensor")),
    "points-fifo": (EXPORT, _data_case(_fifo, "points.tensor")),
    "matrix-nan": (EXPORT, _data_case(_nan_matrix)),
    "points-truncated": (EXPORT, _data_case(_truncate, "points.tensor")),
    "image-is-folder": (EXPORT, _data_case(_dir_image)),
    "no-data-folder": (EXPORT, lambda t, p, f, d: ["--ckpt", p, "--data", t / "nope", "--cameras", "2"]),
    "opset-99": (EXPORT, _args("--opset", "99")),
    "xbound-nan": (EXPORT, _args("--xbound", "nan,54,0.3", "--rebuild-frustum")),
    "xbound-inf-step": (EXPORT, _args("--xbound=-54,54,inf", "--rebuild-frustum")),
    "xbound-tiny-step": (EXPORT, _args("--xbound=-54,54,1e-9", "--rebuild-frustum")),
    "xbound-overflow": (EXPORT, _args("--xbound=0,1,1e-320", "--rebuild-frustum")),
    "ybound-empty-grid": (EXPORT, _args("--ybound=-54,-53.9,0.3", "--rebuild-frustum")),
    "image-size-absurd": (EXPORT, _args("--image-size", "100000x100000", "--rebuild-frustum")),
    "rig-beyond-memory": (EXPORT, lambda t, p, f, d: ["--ckpt", p, "--data", d, "--cameras", "64", "--image-size",
                                                      "8192x8192", "--rebuild-frustum"]),
    "cameras-zero": (EXPORT, lambda t, p, f, d: ["--ckpt", p, "--data", d, "--cameras", "0"]),
    "cameras-negative": (EXPORT, lambda t, p, f, d: ["--ckpt", p, "--data", d, "--cameras", "-3"]),
    "unknown-flag": (EXPORT, _args("--foo")),
    "bad-choice": (EXPORT, _args("--tensorrt", "7")),
    "image-size-text": (EXPORT, _args("--image-size", "abc")),
    "out-is-a-file": (EXPORT, lambda t, p, f, d: ["--ckpt", p, "--data", d, "--cameras", "2", "--out", p]),
    "ptq-batches-0": (PTQ, lambda t, p, f, d: ["--ckpt", f, "--data", d, "--cameras", "2", "--batches", "0"]),
    "ptq-batches-negative": (PTQ, lambda t, p, f, d: ["--ckpt", f, "--data", d, "--cameras", "2", "--batches", "-1"]),
    "ptq-out-unwritable": (PTQ, lambda t, p, f, d: ["--ckpt", f, "--data", d, "--cameras", "2", "--out",
                                                    Path(p) / "sub" / "x.pth"]),
    "ptq-already-quantized": (PTQ, lambda t, p, f, d: ["--ckpt", p, "--data", d, "--cameras", "2"]),
    "ptq-bad-method": (PTQ, lambda t, p, f, d: ["--ckpt", f, "--data", d, "--method", "minmax"]),
    "ptq-no-data": (PTQ, lambda t, p, f, d: ["--ckpt", f, "--data", t / "nope", "--cameras", "2"]),
    "ptq-inf-weights": (PTQ, lambda t, p, f, d: ["--ckpt", _edit(f, t / "x.pth", lambda o: o["state_dict"][
        "encoders.camera.backbone.conv1.weight"].fill_(float("inf"))), "--data", d, "--cameras", "2"]),
    "ptq-hostile": (PTQ, lambda t, p, f, d: ["--ckpt", _hostile(t / "x.pth"), "--data", d, "--cameras", "2"]),
    "ptq-stride0": (PTQ, lambda t, p, f, d: ["--ckpt", _stride0(t / "x.pth"), "--data", d, "--cameras", "2"]),
}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, small_ptq_ckpt, small_float_ckpt, example_dir):
    """A good export and a good PTQ checkpoint that every case must leave byte-identical."""
    from lean.export import ExportOptions, export_camera
    from lean.quantize import PTQOptions, run_ptq

    root = tmp_path_factory.mktemp("earlier")
    export_camera(ExportOptions(ckpt=small_ptq_ckpt, out_dir=root / "onnx", data=example_dir, cameras=2))
    (root / "onnx" / "engine.plan").write_bytes(b"the user's own file")
    run_ptq(PTQOptions(ckpt=small_float_ckpt, out=root / "ptq.pth", data=example_dir, method="max", progress=False,
                       cameras=2, ranges=False))
    return root


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# What each case's one line must say: the check it is named after, not any error at all.
EXPECTED = {
    "amax-wrong-shape": "has shape [3]", "amax-nan": "NaN", "amax-negative": "negative",
    "dx-wrong-shape": "vtransform.dx", "frustum-wrong-shape": "vtransform.frustum", "frustum-nan": "NaN",
    "own-format-no-state-dict": "'state_dict'", "own-format-meta-list": "'meta' is a list",
    "own-format-config-type": "image size", "inf-weights": "NaN or infinite", "ptq-without-amax": "no quantizer amax",
    "zip-crc": "CRC", "zip-deflate-bomb": "compressed", "stride0-weights-only": "over a storage",
    "stride0-restricted-reader": "over a storage", "shared-module-dag": "more than 100000",
    "legacy-huge-storage": "more than the file holds", "truncated-ckpt": "truncated zip archive", "pickle-memo-bomb": "without a camera branch", "hostile-pickle": "posix.system",
    "ckpt-is-fifo": "not a regular file", "control-chars-in-keys": "no camera branch",
    "newline-in-path": "does not exist", "jpeg-65000-square": "the image claims more than",
    "points-dev-zero": "character device", "points-fifo": "a FIFO", "matrix-nan": "NaN or infinite",
    "points-truncated": "truncated", "image-is-folder": "a folder", "no-data-folder": "no such folder",
    "opset-99": "--opset 99", "xbound-nan": "finite", "xbound-inf-step": "finite", "xbound-tiny-step": "BEV grid", "xbound-overflow": "no whole step",
    "ybound-empty-grid": "no whole step",
    "image-size-absurd": "beyond what this tool builds", "rig-beyond-memory": "GiB to export",
    "cameras-zero": "cameras", "cameras-negative": "cameras", "unknown-flag": "--foo", "bad-choice": "--tensorrt",
    "image-size-text": "not HxW", "out-is-a-file": "not a folder", "ptq-batches-0": "--batches",
    "ptq-batches-negative": "--batches", "ptq-out-unwritable": "cannot write", "ptq-already-quantized": "already quantized",
    "ptq-bad-method": "minmax", "ptq-no-data": "no such folder", "ptq-inf-weights": "NaN or infinite",
    "ptq-hostile": "posix.system", "ptq-stride0": "over a storage",
}


def test_every_case_says_what_it_checks():
    assert len(MATRIX) >= 40 and set(EXPECTED) == set(MATRIX)


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_input_is_one_clean_line(tmp_path, case, earlier, small_ptq_ckpt, small_float_ckpt, example_dir):
    command, build = MATRIX[case]
    args = build(tmp_path, small_ptq_ckpt, small_float_ckpt, example_dir)
    out = ["--out", earlier / ("ptq.pth" if command == PTQ else "onnx")] if "--out" not in args else []
    before = _snapshot(earlier)
    r = cli_run(*command.split(), *args, *out)
    lines = r.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr[-2000:]
    assert EXPECTED[case] in errors[0] and "MemoryError" not in r.stderr and "calibrating" not in r.stderr, errors[0]
    assert "Traceback" not in r.stderr and not any(not c.isprintable() for line in lines for c in line)
    assert not (tmp_path / "PWNED").exists()
    assert _snapshot(earlier) == before
    assert not [p.name for p in earlier.iterdir() if p.name.startswith(".")]  # no temp, staging or lock left


def test_negative_bounds_need_no_equals_sign():
    seen = {}

    def main(args):
        seen.update(cli.rig_options(args))

    assert cli.run(main, parser(), ["--xbound", "-51.2,51.2,0.4", "--ybound", "-40,40,0.5"]) == 0
    assert seen["xbound"] == (-51.2, 51.2, 0.4) and seen["ybound"] == (-40.0, 40.0, 0.5)
