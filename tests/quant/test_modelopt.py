import copy
import logging

import numpy as np
import pytest
import torch

from lean.build import fold_bn
from lean.errors import LeanError
from lean.models import build_camera
from lean.quant.modelopt import calibrate, insert_quantizers, quant_config, quantizers, use_native_fake_quant

from helpers import SMALL, random_bn, sample_inputs


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return random_bn(build_camera(SMALL))


@pytest.fixture(scope="module")
def calibrated(float_model):
    model = insert_quantizers(fold_bn(copy.deepcopy(float_model)), "mse")
    calibrate(model, [sample_inputs(SMALL, seed) for seed in range(2)], "mse")
    return model


def every_quantizer_name(model) -> list[str]:
    """Every name under which an enabled quantizer is reachable (shared ones under each of theirs)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, TensorQuantizer) and not m._disabled]


def convs(model, prefixes):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and n.startswith(prefixes)}


def test_every_conv_but_the_downsample_is_quantized(calibrated):
    quantized = convs(calibrated, ("backbone", "neck", "vtransform.dtransform", "vtransform.depthnet"))
    assert len(quantized) == 53 + 4 + 3 + 3
    for name, conv in quantized.items():
        assert not conv.input_quantizer._disabled, name
        assert not conv.weight_quantizer._disabled, name
        assert conv.weight_quantizer.axis == 0 and conv.weight_quantizer.amax.shape == (conv.out_channels, 1, 1, 1)
        assert conv.input_quantizer.amax.numel() == 1
    for name, conv in convs(calibrated, ("vtransform.downsample",)).items():
        assert conv.input_quantizer._disabled and conv.weight_quantizer._disabled, name
    # [-128, 127]: ONNX QuantizeLinear has no narrow range.
    assert all(not q._narrow_range and q.num_bits == 8 and not q._unsigned for q in quantizers(calibrated).values())
    assert not any("maxpool" in n for n in every_quantizer_name(calibrated))


def test_downsample_flag_quantizes_it(float_model):
    model = insert_quantizers(fold_bn(copy.deepcopy(float_model)), "max", quantize_downsample=True)
    assert all(not c.input_quantizer._disabled for c in convs(model, ("vtransform.downsample",)).values())


def test_residual_placement(calibrated):
    for layer in (calibrated.backbone.layer1, calibrated.backbone.layer3):
        first, rest = layer[0], list(layer)[1:]
        assert first.downsample[0].input_quantizer is first.conv1.input_quantizer
        assert first.residual_quantizer is not first.conv1.input_quantizer
        assert not first.residual_quantizer._disabled and first.residual_quantizer.amax.numel() == 1
        for block in rest:
            # identity branch = block input = conv1's input: one quantizer, one scale
            assert block.residual_quantizer is block.conv1.input_quantizer


def test_concat_placement(calibrated):
    neck, bb = calibrated.neck, calibrated.backbone
    assert neck.quant_concat0 is bb.layer3[0].conv1.input_quantizer
    assert neck.quant_concat1 is bb.layer4[0].conv1.input_quantizer
    assert neck.lateral_convs[0].conv.input_quantizer is neck.quant_concat0
    assert neck.lateral_convs[1].conv.input_quantizer is neck.quant_concat1


def test_quantized_model_stays_close_to_float(float_model, calibrated):
    img, depth = sample_inputs(SMALL)
    folded = fold_bn(copy.deepcopy(float_model))
    with torch.no_grad():
        (fq, _), (ff, _) = calibrated(img, depth), folded(img, depth)
    cos = torch.nn.functional.cosine_similarity(fq.flatten(), ff.flatten(), dim=0)
    assert cos > 0.99
    assert not torch.equal(fq, ff)  # the quantizers really act


def test_native_fake_quant_matches_modelopt_kernel(calibrated):
    conv = calibrated.backbone.layer2[1].conv2
    x = torch.randn(2, conv.in_channels, 9, 9) * conv.input_quantizer.amax
    for quantizer, tensor in ((conv.input_quantizer, x), (conv.weight_quantizer, conv.weight.detach())):
        with torch.no_grad():
            native = quantizer(tensor)
            use_native_fake_quant(calibrated, False)
            try:
                reference = quantizer(tensor)
            finally:
                use_native_fake_quant(calibrated, True)
        step = (quantizer.amax / 127).expand_as(tensor) if quantizer.amax.numel() > 1 else quantizer.amax / 127
        diff = (native - reference).abs() / step
        # Same grid and clipping; x*(1/s) vs x*(127/amax) may round a value sitting on a tie
        # the other way, never more than one step.
        assert diff.max() <= 1.0 + 1e-4 and (diff > 1e-3).float().mean() < 1e-3
        assert not torch.equal(native, tensor)


@pytest.mark.parametrize("method", ["max", "percentile", "entropy"])
def test_other_calibration_methods(float_model, method):
    model = insert_quantizers(fold_bn(copy.deepcopy(float_model)), method)
    if method == "entropy":
        # ModelOpt's entropy search is a slow Python loop (BENCHMARKS.md): keep a few.
        for name, q in list(quantizers(model).items())[6:]:
            q.disable()
    calibrate(model, [sample_inputs(SMALL)], method)
    amax = torch.stack([q.amax.max() for q in quantizers(model).values()])
    assert torch.isfinite(amax).all() and (amax > 0).all()


def test_unknown_method_is_a_user_error():
    with pytest.raises(LeanError):
        quant_config("minmax")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("method", ["max", "mse"])
def test_cuda_graph_calibration_equals_eager(float_model, method, caplog):
    """Replaying the captured forward collects exactly what eager forwards collect."""
    batches = [tuple(t.cuda() for t in sample_inputs(SMALL, seed)) for seed in range(3)]
    amax = []
    for graph in (False, True):
        model = insert_quantizers(fold_bn(copy.deepcopy(float_model)), method).cuda()
        with caplog.at_level(logging.WARNING, logger="lean"):
            calibrate(model, batches, method, cuda_graph=graph)
        assert not [r for r in caplog.records if "CUDA graph" in r.getMessage()]
        amax.append({n: q.amax.cpu() for n, q in quantizers(model).items()})
    assert amax[0].keys() == amax[1].keys()
    assert all(torch.equal(amax[0][n], amax[1][n]) for n in amax[0])
