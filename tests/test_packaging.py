"""``pip install .`` (pyproject.toml) into a fresh virtual environment gives working commands that
run from any folder, with default paths relative to that folder."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from helpers import ROOT

COMMANDS = ("lean-export", "lean-ptq", "lean-lint", "lean-check-engine", "lean-demo")


def tracked_files(dest):
    """The repository's tracked files (and this change's untracked, unignored ones): a clean checkout."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, out):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the project installed from a wheel built of a clean copy. The third-party
    dependencies come from this test run's environment (a .pth file): no network in tests."""
    tmp = tmp_path_factory.mktemp("pip")
    src = tracked_files(tmp / "src")
    # No build isolation: the build backend is the test environment's setuptools (requirements-test.txt).
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp / "wheel"), str(src)], capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "test-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = (tmp / "wheel").glob("*.whl")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def command(venv, name, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package, not the clone
    return subprocess.run([str(venv / "bin" / name), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_every_command_runs_from_any_folder(installed, tmp_path):
    for name in COMMANDS:
        r = command(installed, name, "--help", cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {name} "), (name, r.stderr[-2000:])
    r = command(installed, "python", "-c", "import lean, export_camera; print(lean.__file__, export_camera.__file__)",
                cwd=tmp_path)
    assert r.returncode == 0 and str(installed) in r.stdout and str(ROOT) not in r.stdout


def test_default_paths_are_relative_to_the_current_folder(installed, tmp_path):
    r = command(installed, "lean-export", cwd=tmp_path)
    assert r.returncode == 2 and "model/resnet50int8/bevfusion_ptq.pth" in r.stderr and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == r.stderr.splitlines()[-1:]


def test_the_installed_lint_and_engine_check(installed, small_int8_export, tmp_path):
    report, folder = small_int8_export
    r = command(installed, "lean-lint", folder / "camera.backbone.onnx", folder / "camera.vtransform.onnx", cwd=tmp_path)
    assert r.returncode == 0 and "camera.backbone.onnx" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    ref = folder / "camera.vtransform.outputs.json"
    r = command(installed, "lean-check-engine", ref, ref, cwd=tmp_path)  # the reference against itself
    assert r.returncode == 0 and "1 of 1 outputs pass" in r.stdout, r.stdout + r.stderr
