import pytest

from lean.config import CameraConfig, parse_bound, parse_image_size
from lean.errors import LeanError

from helpers import one_line


def test_parse_image_size_and_bound():
    assert parse_image_size("256x704") == (256, 704)
    assert parse_bound("-54,54,0.3", "xbound") == (-54.0, 54.0, 0.3)
    for text, word in (("big", "HxW"), ("250x700", "multiples of 8")):
        with pytest.raises(LeanError) as e:
            parse_image_size(text)
        assert word in one_line(e)
    for text in ("1,2", "5,1,0.1", "0,10,-1"):
        with pytest.raises(LeanError) as e:
            parse_bound(text, "xbound")
        assert "--xbound" in one_line(e)


def test_config_round_trips_and_refuses_unknown_fields():
    cfg = CameraConfig(cameras=5, image_size=(384, 1056))
    assert CameraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LeanError) as e:
        CameraConfig.from_dict({**cfg.to_dict(), "future": 1})
    assert "newer version" in one_line(e)


@pytest.mark.parametrize("kwargs,word", [({"backbone": "vgg"}, "unknown backbone"), ({"cameras": 0}, "--cameras"),
                                         ({"dbound": (5.0, 1.0, 0.5)}, "dbound"),
                                         ({"xbound": (-54.0, 54.0, 0.8)}, "downsample")])
def test_invalid_configs_are_one_line_errors(kwargs, word):
    with pytest.raises(LeanError) as e:
        CameraConfig(**kwargs)
    assert word in one_line(e)
