"""Model -> ONNX proto: one graph traced, its tracing forward kept as the PyTorch reference.

The TorchScript exporter (``dynamo=False``) runs a real forward on the real inputs while it
traces. A forward hook keeps that forward's outputs, so validation needs no second forward.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager

import torch
from torch import nn

import lean


@contextmanager
def exact_float32():
    """PyTorch in true FP32 while the reference runs: CUDA convs default to TF32 (10-bit mantissa),
    which alone puts the reference 1e-3 away from an FP32 graph."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def trace(module: nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str], opset: int):
    """``torch.onnx.export`` of ``module`` on ``inputs`` (named as the graph's inputs) to a proto.

    Returns (proto, {output name: PyTorch output}). Under no_grad: with autograd on, the tracer's
    forward keeps every activation for a backward that never comes.
    """
    import onnx

    seen = []
    hook = module.register_forward_hook(lambda _module, _args, out: seen.append(out))
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, tuple(inputs.values()), buf, opset_version=opset, input_names=list(inputs),
                output_names=output_names, do_constant_folding=True, dynamo=False,
            )
    finally:
        hook.remove()
    outputs = seen[-1] if isinstance(seen[-1], (tuple, list)) else (seen[-1],)
    return onnx.load_from_string(buf.getvalue()), dict(zip(output_names, outputs))


def annotate(model, props: dict) -> None:
    """Producer and ``metadata_props`` of an ONNX proto (replacing any it had)."""
    model.producer_name = "lean"
    model.producer_version = lean.__version__
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
