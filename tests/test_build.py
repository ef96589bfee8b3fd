"""Checkpoint -> model: device and config resolution, BN folding, the folded and INT8 builds."""

import copy

import pytest
import torch

from lean.build import (build_folded, build_model, build_quantized, check_precision, fold_bn, resolve_config,
                        resolve_device, versions)
from lean.checkpoint import Checkpoint
from lean.errors import LeanError
from lean.models import build_camera
from lean.quant.qdq import QDQ

from helpers import SMALL, one_line, random_bn, sample_inputs


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return random_bn(build_camera(SMALL))


def test_fold_bn_keeps_outputs(float_model):
    img, depth = sample_inputs(SMALL)
    folded = fold_bn(copy.deepcopy(float_model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        for a, b in zip(float_model(img, depth), folded(img, depth)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        bev = torch.randn(1, 80, 360, 360)
        assert torch.allclose(float_model.bev_downsample(bev), folded.bev_downsample(bev), atol=1e-4)


def test_build_folded_from_float_and_from_folded_weights_agree(float_model):
    from_float = build_folded(SMALL, float_model.state_dict())
    from_folded = build_folded(SMALL, from_float.state_dict(), folded=True)
    img, depth = sample_inputs(SMALL, seed=1)
    with torch.no_grad():
        for a, b in zip(from_float(img, depth), from_folded(img, depth)):
            assert torch.equal(a, b)
    with pytest.raises(LeanError) as e:
        build_folded(SMALL, from_float.state_dict())  # folded weights into a model with BN
    assert "does not fit" in one_line(e)


def test_build_model_follows_the_checkpoint_and_precision(float_model):
    folded_sd = fold_bn(copy.deepcopy(float_model)).state_dict()
    amax = {"backbone.conv1.input_quantizer._amax": torch.tensor(3.0),
            "backbone.conv1.weight_quantizer._amax": torch.ones(64, 1, 1, 1)}
    ptq = Checkpoint({**folded_sd, **amax}, "ptq", "lean-ptq", config=SMALL)
    int8 = build_model(ptq, SMALL, "int8")
    assert isinstance(int8.backbone.conv1.input_quantizer, QDQ)
    fp16 = build_model(ptq, SMALL, "fp16")
    assert not any(isinstance(m, QDQ) for m in fp16.modules())
    assert torch.equal(build_quantized(SMALL, {**folded_sd, **amax}).backbone.conv1.weight, int8.backbone.conv1.weight)
    flt = Checkpoint(float_model.state_dict(), "float", "official", config=SMALL)
    with pytest.raises(LeanError) as e:
        build_model(flt, SMALL, "int8")
    assert "lean.ptq" in one_line(e) and "--fp16" in one_line(e)
    with pytest.raises(LeanError):
        check_precision(flt, "int4")


def test_resolve_config_checks_overrides(float_model):
    ckpt = Checkpoint(float_model.state_dict(), "float", "official", config=SMALL)
    assert resolve_config(ckpt, cameras=5).cameras == 5
    with pytest.raises(LeanError) as e:
        resolve_config(ckpt, backbone="swint")
    assert "does not match" in one_line(e)
    with pytest.raises(LeanError) as e:
        resolve_config(ckpt, image_size=(128, 352))
    assert "--rebuild-frustum" in one_line(e) and "64x176" in one_line(e)
    assert resolve_config(ckpt, image_size=(128, 352), rebuild_frustum=True).image_size == (128, 352)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LeanError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LeanError) as e:
            resolve_device("cuda")
        assert "--device cpu" in one_line(e)


def test_versions_are_plain_strings():
    v = versions()
    assert {"lean", "torch", "onnx", "onnxscript", "onnxruntime", "nvidia-modelopt"} <= set(v)
    assert all(type(x) is str for x in v.values())
