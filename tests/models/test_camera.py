from pathlib import Path

import pytest
import torch

from lean.config import CameraConfig
from lean.models import build_camera

DATA = Path(__file__).resolve().parents[1] / "data"


def official_keys(name):
    rows = {}
    for line in (DATA / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows[key] = (tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), dtype)
    return rows


def model_keys(model):
    return {f"encoders.camera.{k}": (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()}


def test_resnet50_keys_and_shapes_equal_the_official_list():
    ref = official_keys("keys-resnet50.tsv")
    got = model_keys(build_camera())
    assert sorted(got) == sorted(ref)
    for key, value in ref.items():
        assert got[key] == value, key


def test_default_preset_shapes_follow_the_contract():
    cfg = CameraConfig()
    assert (cfg.depth_bins, cfg.feature_size, cfg.bev_grid) == (118, (32, 88), (360, 360, 1))
    assert tuple(n // cfg.downsample for n in cfg.bev_grid[:2]) == (180, 180)  # feat_out
    model = build_camera(cfg)
    with torch.no_grad():
        levels = model.backbone(torch.zeros(6, 3, 256, 704))
        assert [tuple(t.shape) for t in levels] == [(6, 512, 32, 88), (6, 1024, 16, 44), (6, 2048, 8, 22)]
        assert tuple(model.neck(levels).shape) == (6, 256, 32, 88)
        feat, weights = model(torch.zeros(1, 6, 3, 256, 704), torch.zeros(1, 6, 1, 256, 704))
        assert tuple(feat.shape) == (6, 32, 88, 80)
        assert tuple(weights.shape) == (6, 118, 32, 88)
        assert tuple(model.bev_downsample(torch.zeros(1, 80, 360, 360)).shape) == (1, 80, 180, 180)
    assert torch.allclose(weights.sum(1), torch.ones(6, 32, 88))


def test_small_preset_shapes(small_cfg):
    model = build_camera(small_cfg)
    with torch.no_grad():
        feat, weights = model(torch.zeros(1, 2, 3, 64, 176), torch.zeros(1, 2, 1, 64, 176))
    assert tuple(feat.shape) == (2, 8, 22, 80)
    assert tuple(weights.shape) == (2, 118, 8, 22)
    assert tuple(model.vtransform.frustum.shape) == (118, 8, 22, 3)


def test_frustum_holds_pixel_coordinates_and_depths():
    fr = build_camera().vtransform.frustum
    assert fr[0, 0, -1, 0] == 703 and fr[0, -1, 0, 1] == 255
    assert fr[0, 0, 0, 2] == 1.0 and fr[-1, 0, 0, 2] == 59.5


@pytest.mark.parametrize("size", [(250, 704), (256, 700), (0, 704)])
def test_sizes_the_network_cannot_take_are_one_line_errors(size):
    from lean.errors import LeanError

    with pytest.raises(LeanError) as e:
        CameraConfig(image_size=size)
    assert "\n" not in str(e.value) and "multiples of 8" in str(e.value)
