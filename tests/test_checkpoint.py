import pytest
import torch

from lean.checkpoint import infer_config, load_weights, read_checkpoint, save_checkpoint, save_official
from lean.config import CameraConfig
from lean.errors import LeanError
from lean.models import build_camera

from helpers import SMALL, one_line, sample_inputs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = build_camera(SMALL)
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2)
    return m


def outputs(model):
    img, depth = sample_inputs(SMALL)
    with torch.no_grad():
        return model(img, depth)


def test_official_checkpoint_round_trips_bit_for_bit(tmp_path, model):
    path = tmp_path / "det.pth"
    # Whole-model keys of the other branches are present in official files and must be ignored.
    extra = {"encoders.lidar.backbone.conv_input.0.weight": torch.zeros(3), "fuser.0.weight": torch.zeros(2),
             "decoder.backbone.blocks.0.0.weight": torch.zeros(1)}
    sd = {f"encoders.camera.{k}": v for k, v in model.state_dict().items()} | extra
    torch.save({"state_dict": sd, "meta": {"epoch": 20}}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.source == "mit" and ckpt.kind == "float"
    again = build_camera(infer_config(ckpt.state_dict, cameras=2))
    load_weights(again, ckpt.state_dict)
    for a, b in zip(outputs(model), outputs(again)):
        assert torch.equal(a, b)


def test_bare_and_own_formats_load(tmp_path, model):
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    assert read_checkpoint(bare).source == "state-dict"
    own = tmp_path / "own.pth"
    save_checkpoint(own, model.state_dict(), "float", SMALL, {"note": "x"})
    ckpt = read_checkpoint(own)
    assert ckpt.source == "lean-float" and ckpt.config == SMALL and ckpt.meta == {"note": "x"}
    official = tmp_path / "official.pth"
    save_official(official, model.state_dict())
    assert set(read_checkpoint(official).state_dict) == set(model.state_dict())


def test_config_is_inferred_from_stored_tensors(model):
    assert infer_config(model.state_dict(), cameras=2) == SMALL
    assert infer_config(build_camera(CameraConfig(image_size=(384, 1056))).state_dict()).image_size == (384, 1056)


def test_missing_file(tmp_path):
    with pytest.raises(LeanError) as e:
        read_checkpoint(tmp_path / "nope.pth")
    assert "does not exist" in one_line(e)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    assert "not a PyTorch checkpoint" in one_line(e) or "not a readable" in one_line(e)


def test_truncated_checkpoint(tmp_path, model):
    path = tmp_path / "cut.pth"
    save_official(path, model.state_dict())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    one_line(e)


def test_no_camera_keys(tmp_path):
    path = tmp_path / "lidar.pth"
    torch.save({"state_dict": {"encoders.lidar.x": torch.zeros(1)}}, path)
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    text = one_line(e)
    assert "no camera branch in a known layout" in text and "prefixes seen: encoders.lidar." in text
    for known in ("encoders.camera.backbone.*", "img_backbone.*", "image_backbone.*", "backbone.*"):
        assert known in text


def test_wrong_keys_name_the_offenders(model):
    sd = dict(model.state_dict())
    sd.pop("backbone.layer1.0.conv1.weight")
    sd["backbone.layer9.weight"] = torch.zeros(1)
    with pytest.raises(LeanError) as e:
        load_weights(build_camera(SMALL), sd)
    text = one_line(e)
    assert "backbone.layer1.0.conv1.weight" in text and "backbone.layer9.weight" in text


def test_frustum_of_another_image_size_says_so(model):
    big = build_camera(CameraConfig(cameras=2, image_size=(128, 352))).state_dict()
    sd = dict(model.state_dict())
    sd["vtransform.frustum"] = big["vtransform.frustum"]
    with pytest.raises(LeanError) as e:
        load_weights(build_camera(SMALL), sd)
    text = one_line(e)
    assert "vtransform.frustum" in text and "--image-size" in text and "--rebuild-frustum" in text
