"""The INT8 model of a PTQ checkpoint, as the exporter traces it: fixed-scale Q/DQ, no ModelOpt.

Calibration (``lean.quant.modelopt``) runs ModelOpt; what it leaves in the checkpoint is one amax
per quantizer under ModelOpt's names (``<conv>.input_quantizer._amax``,
``<block>.residual_quantizer._amax``, ...). Exporting needs nothing else, so the model is rebuilt
from those values with the small modules below. That keeps ModelOpt's import (seconds and hundreds
of MB) and its module machinery out of the export, and every Q/DQ pair traces to exactly one
QuantizeLinear -> DequantizeLinear.

The checkpoint decides the placement: a quantizer exists wherever it holds an amax. The recipe
itself (which tensors get one, which share a scale) lives in ``lean.quant.modelopt``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lean.errors import LeanError

QMIN, QMAX = -128, 127  # ONNX QuantizeLinear int8 has no narrow range
# Identity placeholders of the float model that PTQ turns into quantizers.
_PLACEHOLDER = re.compile(r"(.*\.)?(residual_quantizer|quant_concat\d+)")


FP16_MIN_NORMAL = 2.0**-14  # a smaller FP16 scale is subnormal (or 0): TensorRT needs positive normal scales
FP16_MAX = 65504.0


def int8_scale(amax: torch.Tensor) -> torch.Tensor:
    """Float32 scale ``amax / 127`` (flattened); a channel with amax 0 gets scale 1, as ModelOpt's exporter does."""
    amax = amax.detach().float().flatten()
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Symmetric INT8 quantize-dequantize with QuantizeLinear's arithmetic: round(x / s) half to even, saturate."""
    if axis is None:
        s = scale.reshape(())
    else:
        shape = [1] * x.dim()
        shape[axis] = -1
        s = scale.reshape(shape)
    s = s.to(device=x.device, dtype=torch.float32)
    # New tensor from the division, then in place: four passes instead of fake_quantize's mask work.
    return torch.div(x.float(), s).round_().clamp_(QMIN, QMAX).mul_(s).to(x.dtype)


@torch.library.custom_op("lean::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """One Q/DQ pair as one operator: the exporter sees it whole and writes exactly one
    QuantizeLinear -> DequantizeLinear for it (``lean.trace``), in the dtype of ``x`` and ``scale``."""
    return fake_quant(x, scale, axis)


@quantize_dequantize.register_fake
def _(x, scale, axis=None):
    return torch.empty_like(x)


class QDQ(nn.Module):
    """A calibrated quantizer: per-tensor (``axis=None``) or per-channel INT8 with a fixed amax.

    The scale is computed once here, so the traced graph holds it as a plain initializer.
    """

    def __init__(self, amax: torch.Tensor, axis: int | None = None):
        super().__init__()
        self.axis = axis
        scale = int8_scale(amax)
        self.register_buffer("scale", scale.reshape(()) if axis is None else scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.scale, self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, channels={self.scale.numel()}"


class QuantConv2d(nn.Conv2d):
    """Conv2d reading Q/DQ'd input and weight (either may be Identity when a source disabled it)."""

    input_quantizer: nn.Module
    weight_quantizer: nn.Module

    def forward(self, x):
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    input_quantizer: nn.Module
    weight_quantizer: nn.Module

    def forward(self, x):
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


_QUANT_CLASS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def attach_quantizers(model: nn.Module, amax: dict[str, torch.Tensor], disabled: Iterable[str] = ()) -> nn.Module:
    """Put a ``QDQ`` wherever ``amax`` (``<quantizer>._amax`` -> tensor) has one, in place.

    Convs and linears get input and weight quantizers, the residual and concat placeholders get
    theirs; quantizers named in ``disabled`` stay float even with an amax. An amax with no such
    place, or a layer with only one of its two quantizers (unless the source disabled the other),
    is a user error: the checkpoint is not from this model.
    """
    disabled = set(disabled)
    wanted = {k[: -len("._amax")]: v for k, v in amax.items()}
    wanted = {k: v for k, v in wanted.items() if k not in disabled}
    placed = set()
    half = []
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if type(module) in _QUANT_CLASS:
            names = (f"{prefix}input_quantizer", f"{prefix}weight_quantizer")
            found = [n in wanted for n in names]
            if not any(found):
                continue
            if not all(found) and not any(n in disabled for n, f in zip(names, found) if not f):
                half.append(names[found.index(False)])
            module.__class__ = _QUANT_CLASS[type(module)]
            module.input_quantizer = QDQ(_checked(names[0], wanted[names[0]])) if found[0] else nn.Identity()
            module.weight_quantizer = (QDQ(_checked(names[1], wanted[names[1]], module.weight.shape[0]), axis=0)
                                       if found[1] else nn.Identity())
            placed.update(n for n, f in zip(names, found) if f)
        for child_name, child in list(module.named_children()):
            full = prefix + child_name
            if isinstance(child, nn.Identity) and _PLACEHOLDER.fullmatch(full) and full in wanted:
                setattr(module, child_name, QDQ(_checked(full, wanted[full])))
                placed.add(full)
    stray = sorted(set(wanted) - placed)
    if stray:
        raise LeanError(
            f"PTQ checkpoint has amax for {len(stray)} quantizers this model has no place for "
            f"(first: {', '.join(stray[:3])}): is it for another backbone or version?"
        )
    if half:
        raise LeanError(
            f"PTQ checkpoint lacks amax for {len(half)} quantizers (first: {', '.join(half[:3])}): "
            "re-run PTQ (`python -m lean.ptq`) with this version"
        )
    return model


def _checked(name: str, amax: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """An amax as read from a file, refused unless it is finite, not negative, and one value
    (or one per output channel, for a weight quantizer): anything else would silently become
    scale 1 or a broadcast error."""
    if not amax.is_floating_point() or not torch.isfinite(amax).all() or (amax < 0).any():
        raise LeanError(f"PTQ checkpoint's {name}._amax holds a negative, NaN or infinite value: the calibration "
                        "went wrong or the file is damaged; re-run PTQ (`python -m lean.ptq`)")
    if amax.numel() not in (1, channels or 1):
        want = f"1 or {channels} values (one per output channel)" if channels else "a single value"
        raise LeanError(f"PTQ checkpoint's {name}._amax has shape {list(amax.shape)}, expected {want}: it is not for "
                        "this layer; re-run PTQ (`python -m lean.ptq`)")
    return amax


def split_amax(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(weights, quantizer amax) of a PTQ state dict."""
    amax = {k: v for k, v in state_dict.items() if k.endswith("._amax")}
    return {k: v for k, v in state_dict.items() if k not in amax}, amax


def clamp_scales_to_fp16(model: nn.Module) -> int:
    """Keep every Q/DQ scale a positive normal FP16 number before the model goes to half (in place).

    amax / 127 of a dead or tiny channel would round to a subnormal or to 0 in FP16; it is raised
    to FP16's smallest normal instead, which only makes that channel's INT8 grid coarser (its
    values use fewer of the 256 steps). Returns how many scale values were clamped.
    """
    clamped = 0
    for q in model.modules():
        if isinstance(q, QDQ):
            low, high = q.scale < FP16_MIN_NORMAL, q.scale > FP16_MAX
            clamped += int(low.sum() + high.sum())
            q.scale = q.scale.clamp(FP16_MIN_NORMAL, FP16_MAX)
    return clamped
