"""pytorch-quantization's names (CUDA-BEVFusion's ``*._input_quantizer._amax``, its neck's
``quant_concat`` quantizers) renamed to ours, whichever way the file was read."""

from __future__ import annotations

import re

import torch


_CONCAT = re.compile(r"(.*\.)?quant_concat(\d{1,4})\._input_quantizer")
_NECK_CONCAT_AMAX = re.compile(r"neck\.quant_concat(\d{1,4})\._input_quantizer\._amax")


def legacy_state_dict(sd: dict[str, torch.Tensor], disabled=()) -> tuple[dict[str, torch.Tensor], str, tuple[str, ...]]:
    """Camera tensors with pytorch-quantization names (prefix already stripped) -> our PTQ layout:
    the state dict, its kind ("ptq" or "float") and the quantizers the source disabled, by our names.

    ``X._input_quantizer._amax`` -> ``X.input_quantizer._amax``, ``X._weight_quantizer._amax`` ->
    ``X.weight_quantizer._amax``, ``neck.quant_concatJ._input_quantizer._amax`` -> ``neck.quant_concatI._amax``
    (see ``concat_levels``), residual quantizers and weights unchanged. Amax of quantizers the source
    disabled is dropped and their names go to ``disabled_quantizers``; other quantizer internals
    (clip values, ...) are dropped, everything else is kept for the strict weight load to judge.
    """
    levels = concat_levels(sd)
    off = {quantizer_name(q, levels) for q in disabled}
    out = {}
    for key, value in sd.items():
        if key.endswith("._amax"):
            ours = quantizer_name(key[: -len("._amax")], levels)
            if ours not in off:
                out[ours + "._amax"] = value
        elif not any(p.endswith("_quantizer") or re.fullmatch(r"quant_concat\d+", p) for p in key.split(".")[:-1]):
            out[key] = value
    kind = "ptq" if any(k.endswith("._amax") for k in out) or off else "float"
    return out, kind, tuple(sorted(off))


def quantizer_name(name: str, levels: dict[int, int] | None = None) -> str:
    """Our name of a pytorch-quantization quantizer path."""
    m = _CONCAT.fullmatch(name)
    if m:
        j = int(m.group(2))
        return f"{m.group(1) or ''}quant_concat{(levels or {}).get(j, j)}"
    for theirs, ours in (("._input_quantizer", ".input_quantizer"), ("._weight_quantizer", ".weight_quantizer")):
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    return name


def concat_levels(sd: dict[str, torch.Tensor]) -> dict[int, int]:
    """Their concat index -> the neck level it serves (our index).

    CUDA-BEVFusion's patched neck forward walks the levels top-down and numbers the concats in
    that order: ``quant_concat0`` serves the top level, ours serve level i. The concat of a level
    shares its quantizer with that level's lateral conv input, so equal amax identifies the
    level; without that evidence the top-down numbering is assumed.
    """
    amax = {int(m.group(1)): value for key, value in sd.items() if (m := _NECK_CONCAT_AMAX.fullmatch(key))}
    n = len(amax)
    top_down = {j: n - 1 - j for j in amax}
    found = {}
    for j, value in amax.items():
        hits = [i for i in range(n)
                if _same(sd.get(f"neck.lateral_convs.{i}.conv._input_quantizer._amax"), value)]
        found[j] = hits[0] if len(hits) == 1 else None
    if n and None not in found.values() and sorted(found.values()) == sorted(top_down.values()):
        return found
    return top_down


def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
