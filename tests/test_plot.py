import torch

from lean.config import CameraConfig
from lean.plot import plot_bev


class _Sample:
    points = torch.tensor([[10.0, 2.0, 0.0, 0, 0], [-20.0, -5.0, -1.0, 0, 0]])


def test_three_pngs_are_written(tmp_path):
    cfg = CameraConfig(xbound=(-54.0, 54.0, 1.2), ybound=(-54.0, 54.0, 1.2))
    ref = torch.rand(1, 4, 90, 90)
    written = plot_bev(tmp_path, ref, ref + 0.01, _Sample(), cfg)
    assert [p.rsplit("/", 1)[1] for p in written] == ["bev_pytorch.png", "bev_onnx.png", "bev_diff.png"]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
