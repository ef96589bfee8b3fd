"""INT8 post-training quantization of the camera branch with NVIDIA ModelOpt: where the
quantizers go, and the calibration loop that gives each its amax. The only module that imports
ModelOpt; the export never does (it rebuilds the INT8 model with ``lean.quant.qdq``).

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

from lean.bev import pool_to_bev
from lean.errors import LeanError
from lean.log import logger
from lean.quant.calib import RangeCollector
from lean.quant.qdq import fake_quant, int8_scale

CALIBRATION_METHODS = ("mse", "entropy", "percentile", "max")


NATIVE_BACKEND = "lean-native"


def native_fake_quant(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """ModelOpt quant backend that runs ``lean.quant.qdq.fake_quant``, the exported model's own
    arithmetic.

    ModelOpt's default kernel JIT-compiles a CUDA extension on its first GPU call; this runs on
    any device at once, and a calibrated ModelOpt model computes exactly what the model rebuilt
    from its checkpoint computes.
    """
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


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, method: str = "mse", progress=None, cuda_graph: bool = True) -> int:
    """Collect statistics over ``batches`` of (img, depth or None[, sample]) and load every quantizer's amax.

    Weights are calibrated once, from the weights (per-channel max). Activations are collected by
    ``lean.quant.calib.RangeCollector`` in ModelOpt's quantizers (``entropy`` keeps ModelOpt's own
    histogram calibrator), with no host sync. On CUDA the first batch runs eagerly and the
    forward is then captured as a CUDA graph and replayed for every later batch of the same
    shape, which removes the Python cost of the ~200 quantizer calls of each forward. Histograms
    run on a side stream beside the convolutions, which hides most of their cost; ``max`` only
    reduces, gains nothing from a side stream, and stays on the current stream (BENCHMARKS.md).

    With a sample (its rig matrices), a quantized BEV downsample is calibrated on the pooled BEV
    of the same batch, as the runtime feeds it.
    """
    named = quantizers(model)
    weight_qs = {n: q for n, q in named.items() if n.endswith("weight_quantizer")}
    act_qs = [q for n, q in named.items() if n not in weight_qs]
    device = next(model.parameters()).device
    for name, q in weight_qs.items():
        q.disable_quant()
        q.enable_calib()
        q(model.get_submodule(name.rsplit(".", 1)[0]).weight)
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()
        q.disable()  # out of the data loop, which runs the float model
    own = method != "entropy"
    histogram = method not in ("max", "entropy")
    stream = torch.cuda.Stream(device) if histogram and device.type == "cuda" else None
    for q in act_qs:
        if own:
            q._calibrator = RangeCollector(histogram=histogram, stream=stream)
        q.disable_quant()
        q.enable_calib()

    def forget_last():
        for q in act_qs:
            q._calibrator.forget_last()

    def join():  # the statistics of this forward are part of it (and of its CUDA graph)
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)

    def forward(*inputs):
        out = model(*inputs)
        join()
        return out

    downsample_quantized = any(n.startswith("vtransform.downsample.") for n in named)
    captured = None
    seen = 0
    for img, depth, *sample in batches:
        inputs = (img,) if depth is None else (img, depth)  # camera-only branches take no depth
        if captured is not None and captured.fits(inputs):
            feature, weights = captured(inputs)
        else:
            feature, weights = _first_forward(forward, inputs)
            if captured is None and own and cuda_graph and device.type == "cuda":
                forget_last()  # no captured call may re-add counts computed outside the graph
                captured = _CapturedForward.capture(forward, inputs)
                if captured is None:
                    forget_last()  # nor an eager one re-add counts the failed capture never computed
        if downsample_quantized:
            if not sample:
                raise LeanError("calibrating a quantized BEV downsample needs the samples' rig matrices")
            model.bev_downsample(pool_to_bev(feature, weights, sample[0], model))
            join()
        seen += 1
        if progress is not None:
            progress(seen)
    if seen == 0:
        raise LeanError("calibration got no data: pass a folder with at least one sample")
    for q in act_qs:
        if own:
            q.amax = q._calibrator.compute_amax(method).to(device)
        else:
            q.load_calib_amax(method=method)
        q.enable_quant()
        q.disable_calib()
    for q in weight_qs.values():
        q.enable()
    use_native_fake_quant(model)
    return seen


def _first_forward(forward, inputs: tuple):
    """An eager forward; on CUDA on a fresh stream, which also warms up what a graph capture needs."""
    device = inputs[0].device
    if device.type != "cuda":
        return forward(*inputs)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        out = forward(*inputs)
    torch.cuda.current_stream(device).wait_stream(stream)
    return out


class _CapturedForward:
    """One calibration forward captured as a CUDA graph: each replay runs the same kernels on
    new input data, collectors included (they update their statistics in place)."""

    def __init__(self, graph, inputs: tuple, outputs):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs

    @classmethod
    def capture(cls, forward, inputs: tuple):
        static = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the data loader's pinning thread allocates pinned memory meanwhile,
            # which a global capture would refuse ("operation not permitted when stream is capturing").
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = forward(*static)
        except Exception as e:  # noqa: BLE001 - capture is an optimization; calibrate eagerly instead
            logger.warning("CUDA graph capture failed (%s: %s); calibrating without it", type(e).__name__, e)
            return None
        return cls(graph, static, outputs)

    def fits(self, inputs: tuple) -> bool:
        return len(inputs) == len(self.inputs) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device for a, b in zip(inputs, self.inputs))

    def __call__(self, inputs: tuple):
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        return self.outputs
