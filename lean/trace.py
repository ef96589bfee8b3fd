"""Model -> ONNX with PyTorch's torch.export-based exporter (``dynamo=True``, onnxscript).

The exporter runs no forward on real data, so the PyTorch reference is a separate forward
(``reference``). Each Q/DQ module is one custom operator (``lean::quantize_dequantize``), written
here as exactly one QuantizeLinear -> DequantizeLinear in the dtype of its input and scale: FP16
in a typed graph, FP32 in a classic one.

The exporter builds opset 18 or newer (torchlib's floor). For the classic TensorRT 8 graph it is
built at 18 and written down to the asked opset by ``to_opset``: onnx's own version converter
fails on these graphs ("No Adapter From Version $14 for Relu"), and for every operator here the
versions after 13 only added types, or attributes whose default keeps the opset-13 meaning.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

import lean
from lean.errors import LeanError
from lean.names import KEPT_METADATA, unique
from lean.quant.qdq import quantize_dequantize

EXPORTER_MIN_OPSET = 18
# Attributes newer than opset 13, with the value that keeps the opset-13 behaviour.
NEWER_DEFAULTS = {
    ("QuantizeLinear", "saturate"): 1, ("Resize", "antialias"): 0, ("Resize", "keep_aspect_ratio_policy"): b"stretch",
    ("Reshape", "allowzero"): 0,
}


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


class CastIO(nn.Module):
    """FP32 bindings around an FP16 graph (``--io fp32``): one Cast per input and per output."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        out = self.inner(*(a.half() for a in args))
        return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


@torch.no_grad()
def reference(module: nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str]) -> dict[str, torch.Tensor]:
    """The PyTorch outputs the graph must reproduce (under no_grad: no activation is kept)."""
    out = module(*inputs.values())
    return dict(zip(output_names, out if isinstance(out, (tuple, list)) else (out,)))


def qdq_translation_table(opset: int) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the Q/DQ op's ONNX form at ``opset``."""
    return {quantize_dequantize._opoverload: _qdq_translation(opset)}


def _qdq_translation(opset: int):
    """The ONNX form of ``lean::quantize_dequantize``: QuantizeLinear -> DequantizeLinear, zero point 0
    (int8), per channel on ``axis`` for weights. The opset-13 form below 19, where
    QuantizeLinear-19's ``saturate`` attribute does not exist yet."""
    import onnx_ir as ir
    import onnxscript

    op = onnxscript.values.Opset("", 19 if opset >= 19 else 13)

    def quantize_dequantize(x, scale, axis: int | None = None):
        zero = op.Constant(value=ir.tensor(np.zeros(() if axis is None else tuple(scale.shape), np.int8)))
        kw = {} if axis is None else {"axis": axis}
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero, **kw), scale, zero, **kw)

    return quantize_dequantize


def trace(module: nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str], opset: int):
    """torch.export -> ONNX IR model (``onnx_ir.Model``), unoptimized, at ``max(opset, 18)``."""
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and the like, on every export
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, tuple(inputs.values()), dynamo=True, opset_version=max(opset, EXPORTER_MIN_OPSET),
                input_names=list(inputs), output_names=output_names,
                custom_translation_table=qdq_translation_table(opset),
                optimize=False, external_data=False, verbose=False,
            )
    finally:
        quiet.setLevel(level)
    return program.model


def to_proto(model, opset: int):
    """ONNX IR model -> ModelProto at ``opset``. Nodes keep only the module-scope metadata
    (``lean.names.KEPT_METADATA``): no stack traces with the exporting machine's paths, so the
    same export gives the same bytes anywhere."""
    import onnx_ir as ir

    proto = ir.to_proto(model)
    for item in (*proto.graph.value_info, *proto.graph.input, *proto.graph.output, *proto.graph.initializer):
        del item.metadata_props[:]
    for node in proto.graph.node:
        kept = [(p.key, p.value) for p in node.metadata_props if p.key in KEPT_METADATA]
        del node.metadata_props[:]
        for key, value in kept:
            node.metadata_props.add(key=key, value=value)
    _drop_reshape_allowzero(proto)
    if opset < EXPORTER_MIN_OPSET:
        to_opset(proto, opset)
    return proto


def _drop_reshape_allowzero(proto) -> None:
    """torch writes Reshape(allowzero=1); with a constant shape holding no 0 it means what the default
    (and opset 13, and older TensorRT parsers) mean."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in proto.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    for node in proto.graph.node:
        az = [a for a in node.attribute if a.name == "allowzero"] if node.op_type == "Reshape" else []
        if not az or az[0].i == 0:
            continue
        shape = inits[node.input[1]] if node.input[1] in inits else consts.get(node.input[1])
        if shape is not None and not (numpy_helper.to_array(shape) == 0).any():
            node.attribute.remove(az[0])


def to_opset(proto, target: int) -> None:
    """Write a graph built at opset 18 down to ``target`` (in place), or refuse with the reason."""
    from onnx import defs, helper

    if target < 17:  # LayerNormalization is an opset-17 op: spelled out as before it (SwinT)
        _spell_out_layer_norms(proto)
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise LeanError(f"cannot write {node.name} ({node.domain}) at opset {target}: use a newer --opset")
        try:
            schema = defs.get_schema(node.op_type, target)
        except defs.SchemaError:
            raise LeanError(f"{node.op_type} does not exist at opset {target}: use a newer --opset") from None
        keep = []
        for a in node.attribute:
            if a.name in schema.attributes:
                keep.append(a)
            elif NEWER_DEFAULTS.get((node.op_type, a.name)) != helper.get_attribute_value(a):
                raise LeanError(f"{node.name}: {a.name}={helper.get_attribute_value(a)!r} has no opset-{target} "
                                "form: use a newer --opset")
        del node.attribute[:]
        node.attribute.extend(keep)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target


def _spell_out_layer_norms(proto) -> None:
    """LayerNormalization over the last axis -> ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul/Add,
    the form the TorchScript exporter wrote at opset 13 (in place)."""
    from onnx import helper, numpy_helper

    nodes = []
    taken = {n.name for n in proto.graph.node}
    for node in proto.graph.node:
        if node.op_type != "LayerNormalization":
            nodes.append(node)
            continue
        scope = node.name.rsplit("/", 1)[0] if node.name.startswith("/") else ""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        outputs = [o for o in node.output if o]
        if attrs.get("axis", -1) != -1 or len(outputs) > 1:
            raise LeanError(f"{node.name}: LayerNormalization over axis {attrs.get('axis')} has no opset-13 form here: "
                            "use --opset 17")
        x, scale, bias = (list(node.input) + [""] * 3)[:3]
        p = node.output[0]  # tensor names of the spelled-out steps
        eps = numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), np.float32), f"{p}_eps")
        proto.graph.initializer.append(eps)
        steps = [
            ("ReduceMean", [x], f"{p}_mean", {"axes": [-1]}),
            ("Sub", [x, f"{p}_mean"], f"{p}_d", {}),
            ("Mul", [f"{p}_d", f"{p}_d"], f"{p}_sq", {}),
            ("ReduceMean", [f"{p}_sq"], f"{p}_var", {"axes": [-1]}),
            ("Add", [f"{p}_var", eps.name], f"{p}_ve", {}),
            ("Sqrt", [f"{p}_ve"], f"{p}_std", {}),
            ("Div", [f"{p}_d", f"{p}_std"], f"{p}_n", {}),
            ("Mul", [f"{p}_n", scale], f"{p}_scaled" if bias else node.output[0], {}),
        ]
        if bias:
            steps.append(("Add", [f"{p}_scaled", bias], node.output[0], {}))
        for op, inputs, output, kw in steps:
            new = helper.make_node(op, inputs, [output], name=unique(f"{scope}/{op}", taken), **kw)
            new.metadata_props.extend(node.metadata_props)  # the same module made it
            nodes.append(new)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def annotate(model, props: dict) -> None:
    """Producer and ``metadata_props`` of an ONNX proto (replacing any it had)."""
    model.producer_name = "lean"
    model.producer_version = lean.__version__
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
