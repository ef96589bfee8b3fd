"""``python -m lean.ptq`` on broken nuScenes trees and example-data folders, as a user meets them:
each fault is one line on stderr naming the file (or table record) and what is wrong, exit 2, no
traceback, no partial checkpoint, the earlier checkpoint byte-identical, no process left behind.
One broken sample stops the run (README: "Calibrating on nuScenes")."""

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import default_sigint, python


@pytest.fixture(scope="module")
def tree(tmp_path_factory, example_dir):
    """A v1.0-mini tree of mini_val's scene-0103, two samples, two sweeps between key frames."""
    from lean.scene import make_nuscenes_tree

    return make_nuscenes_tree(tmp_path_factory.mktemp("ns") / "nuscenes", example_dir, scenes=1, samples_per_scene=2,
                              sweeps_between=2, start_scene=103)


def table(root: Path, name: str) -> list:
    return json.loads((root / "v1.0-mini" / f"{name}.json").read_text())


def edit_table(name, change):
    def fault(root: Path):
        records = table(root, name)
        change(records, root)
        (root / "v1.0-mini" / f"{name}.json").write_text(json.dumps(records))
    return fault


def data_file(root: Path, channel: str, suffix: str, index: int = 0) -> Path:
    """The ``index``-th file of ``channel`` the tables name (sorted), ending in ``suffix``."""
    names = sorted(r["filename"] for r in table(root, "sample_data") if f"/{channel}/" in r["filename"]
                   and r["filename"].endswith(suffix))
    return root / names[index]


def replace(path: Path, data: bytes | None):
    path.unlink()  # the tree's images are hard links to the example's: never write through them
    if data is not None:
        path.write_bytes(data)


def camera(data):
    return lambda root: replace(data_file(root, "CAM_FRONT", ".jpg"), data(data_file(root, "CAM_FRONT", ".jpg")))


def sweep(data, key=False):
    def fault(root):
        sweeps = sorted(r["filename"] for r in table(root, "sample_data")
                        if r["filename"].startswith("sweeps/LIDAR_TOP" if not key else "samples/LIDAR_TOP"))
        path = root / sweeps[0]
        replace(path, data(path))
    return fault


def first(records, key, value=None):
    return next(r for r in records if value is None or r[key] == value)


def set_field(name, field, value, where=lambda r: True):
    def change(records, root):
        next(r for r in records if where(r))[field] = value
    return edit_table(name, change)


def keyed(channel):  # a sample_data record of this channel's key frame
    return lambda r: r["is_key_frame"] and f"/{channel}/" in r["filename"]


FAULTS = {
    "truncated jpeg": (camera(lambda p: p.read_bytes()[:len(p.read_bytes()) // 3]), "cannot decode the image", ".jpg"),
    "not a jpeg": (camera(lambda p: b"this is text, not an image\n" * 10), "cannot decode the image", ".jpg"),
    "missing jpeg": (camera(lambda p: None), "no such file", ".jpg"),
    "jpeg is a folder": (lambda root: (replace(data_file(root, "CAM_FRONT", ".jpg"), None),
                                       data_file(root, "CAM_FRONT", ".jpg").mkdir()), "not a regular file (a folder)", ".jpg"),
    "missing sweep": (sweep(lambda p: None), "no such file", ".pcd.bin"),
    "empty sweep": (sweep(lambda p: b""), "empty (0 bytes)", ".pcd.bin"),
    "sweep not whole points": (sweep(lambda p: p.read_bytes()[:-6]), "not a whole number of 5-float points", ".pcd.bin"),
    "missing key lidar": (sweep(lambda p: None, key=True), "no such file", ".pcd.bin"),
    "nan points": (sweep(lambda p: b"\x00\x00\xc0\x7f" * 5 + p.read_bytes()[20:]), "NaN or infinite", ".pcd.bin"),
    "table not json": (lambda root: (root / "v1.0-mini" / "sample_data.json").write_text("[{\"token\": "),
                       "not valid JSON", "sample_data.json"),
    "table missing": (lambda root: (root / "v1.0-mini" / "sensor.json").unlink(), "no such nuScenes table", "sensor.json"),
    "record misses a field": (edit_table("ego_pose", lambda rs, _: rs[0].pop("rotation")),
                              "a ego_pose record has no 'rotation' field", "ego_pose.json"),
    "unknown ego_pose token": (set_field("sample_data", "ego_pose_token", "nope", keyed("LIDAR_TOP")),
                               "refers to ego_pose 'nope'", "v1.0-mini"),
    "unknown calibrated_sensor token": (set_field("sample_data", "calibrated_sensor_token", "nope", keyed("CAM_FRONT")),
                                        "refers to calibrated_sensor 'nope'", "v1.0-mini"),
    "nan quaternion in ego_pose": (edit_table("ego_pose", lambda rs, _: rs.__setitem__(
        slice(None), [dict(r, rotation=[float("nan"), 0, 0, 0]) for r in rs])), "is not a quaternion", "ego_pose"),
    "zero quaternion in calibrated_sensor": (edit_table("calibrated_sensor", lambda rs, _: rs.__setitem__(
        slice(None), [dict(r, rotation=[0, 0, 0, 0]) for r in rs])), "is not a quaternion", "calibrated_sensor"),
    "intrinsic not 3x3": (edit_table("calibrated_sensor", lambda rs, _: rs.__setitem__(
        slice(None), [dict(r, camera_intrinsic=[[1, 0], [0, 1]]) if r["camera_intrinsic"] else r for r in rs])),
        "is not a 3x3 matrix", "calibrated_sensor"),
    "filename with ..": (set_field("sample_data", "filename", "samples/../../outside.jpg", keyed("CAM_FRONT")),
                         "leaves the dataroot", "samples/../../outside.jpg"),
    "absolute filename": (set_field("sample_data", "filename", "/etc/passwd", keyed("CAM_FRONT")),
                          "leaves the dataroot", "/etc/passwd"),
    "no sample in the split": (edit_table("scene", lambda rs, _: [r.update(name="scene-0001") for r in rs]),
                               "no sample of split 'mini_val'", "v1.0-mini"),
}


def leftover_processes(marker: str) -> list[str]:
    """Processes whose command line holds ``marker`` (the case's own folder)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text and "pytest" not in text:
            out.append(text)
    return out


def run_case(root, out, extra=(), *, ckpt, data_args):
    return python("-m", "lean.ptq", "--ckpt", ckpt, "--out", out, *data_args, "--cameras", "2", "--method", "max",
                  "--workers", "2", *extra)


def assert_refused(r, words, names, out, earlier, marker):
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert words in errors[0] and names in errors[0], errors[0]
    assert "Traceback" not in r.stderr
    assert out.read_bytes() == earlier  # the earlier checkpoint, byte for byte
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no partial or temp file
    deadline = time.monotonic() + 5
    while leftover_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leftover_processes(marker)


@pytest.fixture(scope="module")
def refused(tree, tmp_path_factory, small_float_ckpt, small_ptq_ckpt):
    """Every fault's run, two at a time (each is mostly one core importing and building): by fault,
    (the finished process, its --out, the earlier checkpoint's bytes, its dataroot)."""
    cases = {}
    for fault, (make, _, _) in FAULTS.items():
        case = tmp_path_factory.mktemp("fault")
        root = case / "dataroot"
        shutil.copytree(tree, root, copy_function=os.link)  # data files linked: a fault replaces, never writes through
        shutil.rmtree(root / "v1.0-mini")
        shutil.copytree(tree / "v1.0-mini", root / "v1.0-mini")  # the tables are edited in place
        make(root)
        out = case / "out" / "ptq.pth"
        out.parent.mkdir()
        shutil.copy(small_ptq_ckpt, out)
        cases[fault] = (out, out.read_bytes(), root)

    def run(fault):
        out, _, root = cases[fault]
        return run_case(root, out, ckpt=small_float_ckpt,
                        data_args=("--nuscenes", root, "--version", "v1.0-mini", "--samples", "2"))

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(cases, pool.map(run, cases)))
    return {fault: (done[fault], *cases[fault]) for fault in cases}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_a_broken_nuscenes_tree_is_one_line(fault, refused):
    _, words, names = FAULTS[fault]
    r, out, earlier, root = refused[fault]
    assert_refused(r, words, names, out, earlier, str(root))


def test_folders_symlinked_into_the_dataroot_keep_working(tree, tmp_path, small_float_ckpt):
    """samples/ and sweeps/ on another disk, linked in, as people keep them."""
    root, disk = tmp_path / "dataroot", tmp_path / "other-disk"
    root.mkdir()
    shutil.copytree(tree / "v1.0-mini", root / "v1.0-mini")
    for folder in ("samples", "sweeps"):
        shutil.copytree(tree / folder, disk / folder, copy_function=os.link)
        (root / folder).symlink_to(disk / folder)
    r = run_case(root, tmp_path / "ptq.pth", ckpt=small_float_ckpt,
                 data_args=("--nuscenes", root, "--version", "v1.0-mini", "--samples", "2"))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("fault", ["truncated jpeg", "bad points"])
def test_a_broken_folder_sample_is_one_line(fault, tmp_path, example_dir, small_float_ckpt, small_ptq_ckpt):
    data = tmp_path / "data"
    for name in ("a", "b"):
        shutil.copytree(example_dir, data / name, copy_function=os.link)
    if fault == "truncated jpeg":
        path = sorted((data / "b").glob("0-*.jpg"))[0]
        words = "cannot decode the image"
        replace(path, path.read_bytes()[:500])
    else:
        path = data / "b" / "points.tensor"
        words = "points.tensor"
        replace(path, path.read_bytes()[:-7])
    out = tmp_path / "out" / "ptq.pth"
    out.parent.mkdir()
    shutil.copy(small_ptq_ckpt, out)
    earlier = out.read_bytes()
    r = run_case(data, out, ckpt=small_float_ckpt, data_args=("--data", data))
    assert_refused(r, words, str(path), out, earlier, str(data))


# -- interrupts and dying workers -----------------------------------------------------------------
def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def calibrating(tree, tmp_path, small_float_ckpt):
    """``python -m lean.ptq`` with 4 loader workers, calibrating (a long run: the two samples cycled);
    yields (process, its workers' pids, --out, the stderr lines read so far)."""
    import subprocess
    import sys
    import threading

    from helpers import ROOT

    out = tmp_path / "out" / "ptq.pth"
    out.parent.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "lean.ptq", "--ckpt", str(small_float_ckpt), "--out", str(out),
                             "--nuscenes", str(tree), "--version", "v1.0-mini", "--cameras", "2", "--method", "max",
                             "--workers", "4", "--batches", "100000"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    lines, started = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "calibrating on" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(180), "".join(lines)[-3000:]
        deadline = time.monotonic() + 30
        while len(children(proc.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are reading, the calibration is running
        workers = children(proc.pid)
        assert len(workers) >= 4, workers
        yield proc, workers, out, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(5)


def finished(proc, within: float) -> float:
    t = time.monotonic()
    try:
        proc.wait(within)
    except Exception:
        proc.kill()
        raise AssertionError(f"lean.ptq still running {within} s later")
    return time.monotonic() - t


def assert_gone(pids, out):
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "loader workers left running"
    assert not out.exists() and list(out.parent.iterdir()) == []  # no checkpoint, no temp file


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_an_interrupt_ends_calibration_at_once(calibrating, signum):
    import signal

    proc, workers, out, lines = calibrating
    proc.send_signal(getattr(signal, signum))
    seconds = finished(proc, 30)
    time.sleep(0.2)
    text = "".join(lines)
    assert proc.returncode == 130 and seconds < 10, (proc.returncode, seconds, text[-2000:])
    assert "error: interrupted" in text and "Traceback" not in text
    assert_gone(workers, out)


def test_a_worker_killed_by_the_oom_killer_is_one_line(calibrating):
    import signal

    proc, workers, out, lines = calibrating
    os.kill(workers[0], signal.SIGKILL)
    finished(proc, 60)
    time.sleep(0.2)
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, "".join(lines)[-3000:]
    assert f"data loader process (pid {workers[0]}) was killed by signal" in errors[0]
    assert "Traceback" not in "".join(lines)
    assert_gone(workers, out)


def test_workers_die_with_a_killed_calibration(calibrating):
    """SIGKILL of the calibration process itself (no clean-up runs there): the kernel ends its workers."""
    proc, workers, out, lines = calibrating
    proc.kill()
    finished(proc, 10)
    assert_gone(workers, out)
