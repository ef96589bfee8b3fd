"""Each rule on a small hand-built graph that breaks it, and on one that passes."""

import numpy as np
from onnx import helper

from lean.lint.check import lint_model
from lean.lint.rules import ERROR, OK, WARNING, RULES
from lean.names import FP32_NOTE

from lint.graphs import F16, F32, Builder, quantized_block


def verdict(model, rule, target="10", name="graph"):
    return next(f for f in lint_model(model, target, name).findings if f.rule == rule).verdict


def test_a_good_block_passes_every_rule():
    result = lint_model(quantized_block(), "10")
    assert len(result.findings) == len(RULES)
    assert result.verdict == OK, [f.to_json() for f in result.findings if f.verdict != OK]
    assert result.macs == {"INT8": 2 * 64 * 36 * 4}  # two 3x3 convs, 4 -> 4 channels, 8x8


def test_opset():
    assert verdict(quantized_block(opset=13), "opset") == ERROR  # FP16 Q/DQ need 19
    assert verdict(quantized_block(F32, opset=13), "opset", "8") == OK
    assert verdict(quantized_block(F32, opset=13), "opset", "10") == OK  # FP32 Q/DQ are fine at 13
    assert verdict(quantized_block(F32, opset=19), "opset", "8") == ERROR  # TensorRT 8 parses up to 17


def _with(op, **attrs):
    b = Builder()
    return b.model(b.node(op, ["x"], **attrs))


def test_operators():
    assert verdict(_with("Unique"), "operators") == ERROR
    assert verdict(_with("LayerNormalization", axis=-1), "operators", "8") == ERROR  # TensorRT 8.6 added it
    assert verdict(_with("Relu"), "operators", "8") == OK
    assert verdict(_with("Gelu"), "operators") == WARNING  # not in the table at hand
    b = Builder()
    plugin = b.model(b.node("Relu", ["x"]))
    plugin.graph.node[0].domain = "trt"
    plugin.opset_import.append(helper.make_opsetid("trt", 1))
    assert verdict(plugin, "operators") == WARNING  # a plugin op, not a refusal


def _cast_io():
    b = Builder(F16)
    y = b.node("Cast", [b.node("Relu", [b.node("Cast", ["x"], to=F16)])], to=F32)
    return b.model(y, io_dtype=F32)


def test_typing_io():
    assert verdict(_cast_io(), "typing.io") == WARNING
    assert verdict(quantized_block(), "typing.io") == OK
    assert verdict(quantized_block(F32, opset=13), "typing.io", "8") == OK


def test_typing_compute():
    assert verdict(quantized_block(F32), "typing.compute", "11") == ERROR  # 11 builds strongly typed only
    fp32 = next(f for f in lint_model(quantized_block(F32), "10").findings if f.rule == "typing.compute")
    assert fp32.verdict == WARNING and "weakly typed with --fp16 (deprecated since 10.12)" in fp32.note
    classic = next(f for f in lint_model(quantized_block(F32, opset=13), "8").findings if f.rule == "typing.compute")
    assert classic.verdict == OK and classic.note == ""  # no "FP16 tensors" note on a graph without them
    b = Builder(F16)
    island = b.node("Cast", [b.node("Softmax", [b.node("Cast", [b.node("Relu", ["x"])], to=F32)])], to=F16)
    model = b.model(b.node("Relu", [island]))
    finding = next(f for f in lint_model(model, "11").findings if f.rule == "typing.compute")
    assert finding.verdict == ERROR and finding.offenders == ["softmax3"]  # FP32 compute nobody declared
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.metadata_props.add(key=FP32_NOTE, value="--keep-fp32 x")  # an island the file declares
    finding = next(f for f in lint_model(model, "11").findings if f.rule == "typing.compute")
    assert finding.verdict == OK and "1 nodes in FP32 islands" in finding.note
    assert verdict(_cast_io(), "typing.compute") == OK


def test_typing_casts():
    b = Builder(F16)
    y = b.node("Relu", [b.node("Cast", [b.node("Cast", ["x"], to=F32)], to=F16)])
    assert verdict(b.model(y), "typing.casts") == WARNING
    assert verdict(_cast_io(), "typing.casts") == OK


def test_qdq_coverage():
    b = Builder()
    assert verdict(b.model(b.conv("x", quantize_weight=False)), "qdq.coverage") == ERROR
    b = Builder()
    assert verdict(b.model(b.conv("x", quantize_input=False)), "qdq.coverage") == WARNING  # weight-only
    b = Builder()
    y = b.conv(b.conv("x"), quantize_input=False, quantize_weight=False)
    assert verdict(b.model(y), "qdq.coverage") == WARNING  # float on purpose?
    b = Builder()
    assert verdict(b.model(b.conv("x", quantize_input=False, quantize_weight=False)), "qdq.coverage") == OK


def test_qdq_zero_point():
    b = Builder()
    assert verdict(b.model(b.node("Relu", [b.qdq("x", zero=3)])), "qdq.zero_point") == ERROR
    assert verdict(quantized_block(), "qdq.zero_point") == OK
    model = quantized_block()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            del node.input[2]
    assert verdict(model, "qdq.zero_point") == WARNING  # ONNX then means UINT8


def test_qdq_weights():
    assert verdict(quantized_block(weight_scale=0.01), "qdq.weights") == WARNING  # per tensor
    assert verdict(quantized_block(weight_scale=np.full(4, 0.01), axis=1), "qdq.weights") == ERROR
    assert verdict(quantized_block(weight_scale=np.full(2, 0.01), axis=0), "qdq.weights") == ERROR


def test_qdq_activations():
    b = Builder()
    assert verdict(b.model(b.conv(b.qdq("x", np.full(4, 0.05), axis=1))), "qdq.activations") == ERROR
    # A weight that reaches its Q/DQ through an Identity (shared weights) is still a weight.
    b = Builder()
    w = b.node("Identity", [b.const(np.random.default_rng(0).standard_normal((4, 4, 3, 3)) * 0.1)])
    y = b.node("Conv", [b.qdq("x"), b.qdq(w, np.full(4, 0.01), axis=0)], pads=[1, 1, 1, 1])
    assert verdict(b.model(y), "qdq.activations") == OK


def test_qdq_scales():
    b = Builder()
    assert verdict(b.model(b.conv("x", weight_scale=np.array([0.01, 1e-6, 0.01, 0.01]))), "qdq.scales") == ERROR
    b = Builder()
    assert verdict(b.model(b.conv("x", weight_scale=np.array([0.01, -0.01, 0.01, 0.01]))), "qdq.scales") == ERROR
    b = Builder(F32, 13)  # 1e-6 is a normal FP32 number
    assert verdict(b.model(b.conv("x", weight_scale=np.array([0.01, 1e-6, 0.01, 0.01]))), "qdq.scales", "8") == OK


def test_qdq_residual():
    b = Builder()
    y = b.node("Add", [b.conv("x"), b.node("Relu", [b.qdq("x")])])  # the identity is float after its DQ
    assert verdict(b.model(y), "qdq.residual") == WARNING
    assert verdict(quantized_block(), "qdq.residual") == OK
    b = Builder()
    bias = b.node("Add", [b.conv("x"), b.const(np.zeros((1, 4, 1, 1)))])  # a bias add, not a residual
    assert verdict(b.model(bias), "qdq.residual") == OK


def _concat(s1, s2):
    b = Builder()
    return b.model(b.conv(b.node("Concat", [b.qdq("x", s1), b.qdq("x", s2)], axis=1), cin=8))


def test_qdq_concat():
    assert verdict(_concat(0.05, 0.07), "qdq.concat") == WARNING
    assert verdict(_concat(0.05, 0.05), "qdq.concat") == OK


def test_qdq_dead():
    b = Builder()
    assert verdict(b.model(b.node("Softmax", [b.qdq("x")])), "qdq.dead") == WARNING
    assert verdict(quantized_block(), "qdq.dead") == OK
    assert verdict(_pool(0.05, 0.05), "qdq.dead") == OK  # DQ -> MaxPool -> Q -> DQ -> Conv: a quantized pool


def _pool(s1, s2):
    b = Builder()
    pooled = b.node("MaxPool", [b.qdq("x", s1)], kernel_shape=[2, 2], strides=[2, 2])
    return b.model(b.conv(pooled, quantize_input=False) if s2 is None else b.conv(b.qdq(pooled, s2), quantize_input=False))


def test_qdq_passthrough():
    assert verdict(_pool(0.05, 0.08), "qdq.passthrough") == WARNING
    assert verdict(_pool(0.05, 0.05), "qdq.passthrough") == OK


def _vtransform(out_hw):
    b = Builder()
    y = b.node("Conv", ["feat_in", b.const(np.zeros((4, 4, 3, 3)))], pads=[1, 1, 1, 1], strides=[out_hw, out_hw])
    graph = b.model(y, inputs=(("feat_in", [1, 4, 8, 8]),))
    graph.graph.output[0].name = "feat_out"
    graph.graph.node[-1].output[0] = "feat_out"
    return graph


def test_contract():
    assert verdict(_vtransform(2), "contract", name="camera.vtransform.onnx") == OK
    assert verdict(_vtransform(1), "contract", name="camera.vtransform.onnx") == ERROR  # not downsampled
    assert verdict(_vtransform(1), "contract", name="other.onnx") == OK  # not one of ours
    assert verdict(quantized_block(), "contract", name="camera.backbone.onnx") == ERROR  # no img/depth


def test_every_rule_is_tested():
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert {r.__name__ for r in RULES} <= tested
