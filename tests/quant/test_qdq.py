import pytest
import torch

from lean.errors import LeanError
from lean.models import build_camera
from lean.build import build_quantized, fold_bn
from lean.quant.modelopt import calibrate, insert_quantizers
from lean.quant.qdq import QDQ, fake_quant, int8_scale

from helpers import SMALL, sample_inputs


@pytest.fixture(scope="module")
def calibrated():
    """A ModelOpt-calibrated model (the PTQ side) of the small config."""
    torch.manual_seed(0)
    model = insert_quantizers(fold_bn(build_camera(SMALL)), "max")
    calibrate(model, [sample_inputs(SMALL, seed) for seed in range(2)], "max")
    return model


def test_rebuilt_model_computes_what_the_modelopt_model_computes(calibrated):
    rebuilt = build_quantized(SMALL, calibrated.state_dict())
    assert not any(type(m).__module__.startswith("modelopt") for m in rebuilt.modules())
    img, depth = sample_inputs(SMALL, seed=7)
    with torch.no_grad():
        for a, b in zip(calibrated(img, depth), rebuilt(img, depth)):
            assert torch.equal(a, b)
        bev = torch.randn(1, 80, 360, 360)
        assert torch.equal(calibrated.bev_downsample(bev), rebuilt.bev_downsample(bev))


def test_placement_follows_the_checkpoint(calibrated):
    rebuilt = build_quantized(SMALL, calibrated.state_dict())
    qdq = {n for n, m in rebuilt.named_modules() if isinstance(m, QDQ)}
    amax = {k[: -len("._amax")] for k in calibrated.state_dict() if k.endswith("._amax")}
    assert qdq == amax
    assert isinstance(rebuilt.backbone.layer1[1].residual_quantizer, QDQ)
    assert isinstance(rebuilt.neck.quant_concat0, QDQ)
    assert not any(isinstance(m, QDQ) for m in rebuilt.vtransform.downsample.modules())
    assert rebuilt.backbone.conv1.weight_quantizer.scale.shape == (64,)
    assert rebuilt.backbone.conv1.input_quantizer.scale.shape == ()


def test_missing_amax_is_a_one_line_error(calibrated):
    sd = {k: v for k, v in calibrated.state_dict().items() if "layer2.1.conv2.input_quantizer" not in k}
    with pytest.raises(LeanError) as e:
        build_quantized(SMALL, sd)
    assert "layer2.1.conv2.input_quantizer" in str(e.value) and "\n" not in str(e.value)
    # ... unless the source disabled that quantizer: then the conv reads float input.
    model = build_quantized(SMALL, sd, disabled=["backbone.layer2.1.conv2.input_quantizer"])
    assert isinstance(model.backbone.layer2[1].conv2.input_quantizer, torch.nn.Identity)


def test_amax_without_a_place_is_a_one_line_error(calibrated):
    sd = dict(calibrated.state_dict())
    sd["backbone.layer9.0.conv1.input_quantizer._amax"] = torch.tensor(1.0)
    with pytest.raises(LeanError) as e:
        build_quantized(SMALL, sd)
    assert "layer9.0.conv1.input_quantizer" in str(e.value) and "\n" not in str(e.value)


def test_fake_quant_is_quantize_linear_arithmetic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, generator=g) * 3
    amax = torch.tensor([2.0, 0.0, 5.0, 1e-3])
    scale = int8_scale(amax)
    assert scale.tolist() == pytest.approx([2 / 127, 1.0, 5 / 127, 1e-3 / 127])
    got = fake_quant(x, scale, axis=1)
    s = scale.reshape(1, -1, 1, 1)
    want = torch.clamp(torch.round(x / s), -128, 127) * s
    assert torch.equal(got, want)
    # PyTorch's own op agrees up to a tie rounded the other way (x * (1/s) against x / s).
    ref = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(4, dtype=torch.int32), 1, -128, 127)
    assert ((got - ref).abs() / s).max() <= 1.0 + 1e-5
    # Ties go to even, as QuantizeLinear rounds.
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5]) * 0.25
    assert (fake_quant(ties, torch.tensor(0.25), None) / 0.25).tolist() == [0.0, 2.0, 2.0, 0.0]
