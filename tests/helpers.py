"""Test helpers shared by several test files (the fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from lean.config import CameraConfig

SMALL = CameraConfig(cameras=2, image_size=(64, 176))


def sample_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, n, (h, w) = 1, cfg.cameras, cfg.image_size
    img = torch.randn(b, n, 3, h, w, generator=g)
    depth = torch.rand(b, n, 1, h, w, generator=g) * 50 * (torch.rand(b, n, 1, h, w, generator=g) > 0.97)
    return img, depth


def onnx_io(path) -> dict[str, list[int]]:
    """Input and output names of an ONNX file with their static shapes."""
    import onnx

    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(graph.input) + list(graph.output)}


def one_line(excinfo) -> str:
    """The text of a ``pytest.raises`` LeanError, checked to be one non-empty line."""
    text = str(excinfo.value)
    assert text and "\n" not in text
    return text
