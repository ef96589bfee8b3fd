"""Shared fixtures: the example scene, and small float/PTQ checkpoints made by the project itself."""

from __future__ import annotations

import pytest

from helpers import SMALL


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory):
    from lean.scene import make_scene

    folder = tmp_path_factory.mktemp("example-data")
    make_scene(folder)
    return folder


@pytest.fixture(scope="session")
def small_cfg():
    return SMALL


@pytest.fixture(scope="session")
def small_float_ckpt(tmp_path_factory, example_dir):
    """Demo-style float checkpoint (official layout) on the small config."""
    from lean.checkpoint import save_official
    from lean.data import load_example
    from lean.scene import make_demo_model

    sample = load_example(example_dir, image_size=SMALL.image_size, cameras=SMALL.cameras)
    model = make_demo_model(SMALL, sample)
    path = tmp_path_factory.mktemp("ckpt") / "float.pth"
    save_official(path, model.state_dict())
    return path


@pytest.fixture(scope="session")
def small_ptq_ckpt(tmp_path_factory, small_float_ckpt, example_dir):
    from lean.quantize import PTQOptions, run_ptq

    path = tmp_path_factory.mktemp("ckpt") / "ptq.pth"
    run_ptq(PTQOptions(ckpt=small_float_ckpt, out=path, data=example_dir, method="max", progress=False))
    return path


def _small_export(tmp_path_factory, ckpt, data, name, **kw):
    from lean.export import ExportOptions, export_camera

    out = tmp_path_factory.mktemp(name)
    return export_camera(ExportOptions(ckpt=ckpt, out_dir=out, data=data, cameras=SMALL.cameras, **kw)), out


@pytest.fixture(scope="session")
def small_int8_export(tmp_path_factory, small_ptq_ckpt, example_dir):
    """(report, folder) of the default INT8 export (typed, TensorRT 10/11) of the small PTQ checkpoint."""
    return _small_export(tmp_path_factory, small_ptq_ckpt, example_dir, "int8")


@pytest.fixture(scope="session")
def small_classic_export(tmp_path_factory, small_ptq_ckpt, example_dir):
    """(report, folder) of the classic INT8 export (TensorRT 8) of the small PTQ checkpoint."""
    return _small_export(tmp_path_factory, small_ptq_ckpt, example_dir, "int8-trt8", tensorrt="8")


@pytest.fixture(scope="session")
def small_fp16_export(tmp_path_factory, small_ptq_ckpt, example_dir):
    """(report, folder) of the FP16 export (typed) of the small PTQ checkpoint."""
    return _small_export(tmp_path_factory, small_ptq_ckpt, example_dir, "fp16", fp16=True)


@pytest.fixture(scope="session")
def small_fp16_classic_export(tmp_path_factory, small_ptq_ckpt, example_dir):
    """(report, folder) of the classic FP16 export (TensorRT 8) of the small PTQ checkpoint."""
    return _small_export(tmp_path_factory, small_ptq_ckpt, example_dir, "fp16-trt8", fp16=True, tensorrt="8")
