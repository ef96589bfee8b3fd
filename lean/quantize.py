"""INT8 post-training quantization of the camera branch with NVIDIA ModelOpt.

The placement follows CUDA-BEVFusion's recipe, so TensorRT can run the whole branch in INT8:
- BN folded into convs first (TensorRT folds them anyway; the scales must see folded weights);
- every conv of backbone, neck, dtransform and depthnet: per-channel weights (axis 0), per-tensor
  activations, symmetric, range [-128, 127] (ONNX QuantizeLinear has no narrow range);
- residual add: only the identity branch is quantized, so TensorRT fuses conv3 + add;
- neck concats: one quantizer for all inputs, shared with the next backbone conv that reads the
  same tensor, so the tensor carries one scale everywhere;
- the vtransform ``downsample`` stays float (FP16 in the engine) unless asked.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from lean.errors import LeanError

CALIBRATION_METHODS = ("mse", "entropy", "percentile", "max")
PERCENTILE = 99.99


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d into the Conv2d registered right before it (in place).

    All our modules register a BN directly after the conv it normalizes, and apply it there.
    """
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                _fold_into(conv, bn)
                setattr(parent, bn_name, nn.Identity())
    leftover = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if leftover:
        raise RuntimeError(f"BN without a preceding conv cannot be folded: {leftover[:3]}")
    return model


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale)


NATIVE_BACKEND = "lean-native"


def native_fake_quant(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """ModelOpt quant backend that runs ``lean.qdq.fake_quant``, the exported model's own arithmetic.

    ModelOpt's default kernel JIT-compiles a CUDA extension on its first GPU call (about a
    minute); this runs on any device at once, and a calibrated ModelOpt model computes exactly
    what the model rebuilt from its checkpoint computes.
    """
    from lean.qdq import fake_quant, int8_scale

    return fake_quant(inputs, int8_scale(quantizer.amax), quantizer.axis)


def _register_backend() -> None:
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import is_registered_quant_backend, register_quant_backend

    if not is_registered_quant_backend(NATIVE_BACKEND):
        register_quant_backend(NATIVE_BACKEND, native_fake_quant)


def use_native_fake_quant(model: nn.Module, enable: bool = True) -> None:
    """Route every quantizer through ``native_fake_quant`` (or back to ModelOpt's kernel)."""
    _register_backend()
    for q in quantizers(model).values():
        q.backend = NATIVE_BACKEND if enable else None


def quant_config(method: str = "mse", quantize_downsample: bool = False) -> dict:
    """ModelOpt config: INT8 weights per channel, activations per tensor, [-128, 127]."""
    if method not in CALIBRATION_METHODS:
        raise LeanError(f"unknown calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    act = {"num_bits": 8, "axis": None, "narrow_range": False}
    if method != "max":
        act["calibrator"] = "histogram"
    weight = {"num_bits": 8, "axis": 0, "narrow_range": False}
    entries = [{"quantizer_name": "*", "enable": False}]
    # Only convs and linears carry Q/DQ: pooling, LayerNorm, GELU and softmax stay float, and
    # TensorRT moves scales across pooling by itself.
    for parent in ("nn.Conv2d", "nn.Linear"):
        entries += [
            {"quantizer_name": "*weight_quantizer", "parent_class": parent, "cfg": weight},
            {"quantizer_name": "*input_quantizer", "parent_class": parent, "cfg": act},
        ]
    if not quantize_downsample:
        entries.append({"quantizer_name": "vtransform.downsample.*", "enable": False})
    return {"quant_cfg": entries, "algorithm": None}


def _new_quantizer(act_cfg: dict) -> nn.Module:
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    return TensorQuantizer(QuantizerAttributeConfig(**act_cfg))


def insert_quantizers(model: nn.Module, method: str = "mse", quantize_downsample: bool = False) -> nn.Module:
    """Swap convs for ModelOpt quant convs and add the residual and concat quantizers.

    Expects a BN-folded model; returns the same model object, quantizers not yet calibrated.
    """
    import modelopt.torch.quantization as mtq

    cfg = quant_config(method, quantize_downsample)
    # ModelOpt prints "Inserted N quantizers" to stdout, which belongs to the summary table.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, cfg)
    act_cfg = next(e["cfg"] for e in cfg["quant_cfg"] if e["quantizer_name"] == "*input_quantizer")
    _place_residual_quantizers(model.backbone, act_cfg)
    _place_concat_quantizers(model, act_cfg)
    return model


def _place_residual_quantizers(backbone: nn.Module, act_cfg: dict) -> None:
    for block in backbone.modules():
        if not hasattr(block, "residual_quantizer"):
            continue
        if block.downsample is None:
            # The identity is the block input, which conv1 already quantizes: one quantizer, one scale.
            block.residual_quantizer = block.conv1.input_quantizer
        else:
            block.downsample[0].input_quantizer = block.conv1.input_quantizer
            block.residual_quantizer = _new_quantizer(act_cfg)


def _place_concat_quantizers(model: nn.Module, act_cfg: dict) -> None:
    neck, backbone = model.neck, model.backbone
    consumers = backbone.level_consumers() if hasattr(backbone, "level_consumers") else []
    for i, lateral in enumerate(neck.lateral_convs):
        consumer = consumers[i] if i < len(consumers) else None
        shared = getattr(consumer, "input_quantizer", None) if consumer is not None else None
        quantizer = shared if shared is not None and not shared._disabled else _new_quantizer(act_cfg)
        setattr(neck, f"quant_concat{i}", quantizer)
        # The lateral conv reads the concat; quantizing again with the same scale is exact and
        # lets TensorRT keep the concat in INT8 without a scale change.
        lateral.conv.input_quantizer = quantizer


def quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Enabled quantizers by first name (shared ones appear once)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and not m._disabled}


def quantizer_names(model: nn.Module) -> dict[str, list[str]]:
    """Every name under which each enabled quantizer is reachable, keyed by its first name."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, TensorQuantizer) and not m._disabled:
            key = first.setdefault(id(m), n)
            names.setdefault(key, []).append(n)
    return names


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, method: str = "mse", progress=None) -> int:
    """Collect statistics over ``batches`` of (img, depth[, sample]) and load every quantizer's amax.

    With a sample (its rig matrices), a quantized BEV downsample is calibrated on the pooled BEV
    of the same batch, as the runtime feeds it.
    """
    named = quantizers(model)
    qs = list(named.values())
    device = next(model.parameters()).device
    for q in qs:
        q.disable_quant()
        q.enable_calib()
    downsample_quantized = any(n.startswith("vtransform.downsample.") for n in named)
    seen = 0
    for img, depth, *sample in batches:
        feature, weights = model(img, depth)
        if downsample_quantized:
            if not sample:
                raise LeanError("calibrating a quantized BEV downsample needs the samples' rig matrices")
            from lean.bev import pool_to_bev

            model.bev_downsample(pool_to_bev(feature, weights, sample[0], model))
        seen += 1
        if progress is not None:
            progress(seen)
    if seen == 0:
        raise LeanError("calibration got no data: pass a folder with at least one sample")
    for q in qs:
        kind = type(q._calibrator).__name__
        if kind == "HistogramCalibrator" and method == "mse":
            q.amax = mse_amax(q._calibrator._calib_hist, q._calibrator._calib_bin_edges).to(device)
        elif kind == "HistogramCalibrator":
            kwargs = {"percentile": PERCENTILE} if method == "percentile" else {}
            q.load_calib_amax(method=method, **kwargs)
        else:
            q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()
    use_native_fake_quant(model)
    return seen


def mse_amax(hist, edges, start_bin: int = 128, chunk: int = 256) -> torch.Tensor:
    """amax minimizing the histogram-weighted MSE of INT8 [-128, 127] fake quantization.

    The search is pytorch-quantization's (every bin centre from ``start_bin`` on is a candidate).
    ModelOpt 0.47's own ``compute_amax("mse")`` passes ``num_bits`` into the ``bias`` slot of its
    fake-quant call and returns a wrong amax, and it loops in Python over ~2000 candidates, so
    the search is done here, vectorized, on the histogram ModelOpt collected.
    """
    if hist is None or edges is None:
        raise LeanError("a quantizer saw no data during calibration: the calibration data never reached it")
    # ModelOpt keeps numpy histograms on CPU and torch ones on the GPU (with CPU bin edges).
    counts = torch.as_tensor(hist).detach().cpu().double().flatten()
    edges = torch.as_tensor(edges).detach().cpu().double().flatten()
    centers = (edges[1:] + edges[:-1]) / 2
    candidates = centers[min(start_bin, len(centers) - 1) :]
    best_err, best = None, None
    for part in candidates.split(chunk):
        scale = 127.0 / part[:, None]
        fq = torch.clamp(torch.round(centers[None] * scale), -128, 127) / scale
        err = ((fq - centers[None]) ** 2 * counts[None]).sum(1)
        i = int(err.argmin())
        if best_err is None or err[i] < best_err:
            best_err, best = err[i], part[i]
    return best.float()
