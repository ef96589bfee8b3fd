"""Validation: the tolerances, onnx.checker + ONNX Runtime against PyTorch, and that a broken
graph is caught."""

import onnx
import pytest
import torch
from onnx import numpy_helper

from lean.data import load_inputs
from lean.errors import LeanError
from lean.export import BACKBONE_FILE
from lean.validate import TOLERANCES, compare, feeds, ort_session, tolerance, validate

from helpers import SMALL


FLOAT, INT8 = TOLERANCES[("fp16", False)], TOLERANCES[("int8", False)]


def test_float_tolerance_is_relative_to_the_output_range():
    ref = torch.linspace(-10, 10, 1000)
    assert compare(ref + 9e-4, ref, FLOAT)["ok"]  # 9e-4 < 1e-4 * 10
    assert not compare(ref + 2e-3, ref, FLOAT)["ok"]
    assert FLOAT.bound(10.0) == pytest.approx(1e-3)
    typed = tolerance("fp16", True)
    assert compare(ref.half(), ref, typed)["ok"] and not compare(ref * 1.05, ref, typed)["ok"]


def test_int8_tolerance_needs_both_cosine_and_steps():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(10000, generator=g)
    step = ref.abs().max() / 127
    noisy = ref + torch.randn(10000, generator=g) * step  # one step of noise: cosine ~0.9997
    assert compare(noisy, ref, INT8)["ok"]
    spike = ref.clone()
    spike[0] += 60 * step  # one value 60 steps off: cosine still high, the step bound fails it
    stats = compare(spike, ref, INT8)
    assert stats["cosine"] > 0.97 and not stats["ok"]
    assert not compare(ref + torch.randn(10000, generator=g) * 0.3, ref, INT8)["ok"]  # cosine ~0.96


@pytest.mark.parametrize("export,typed", [("small_int8_export", True), ("small_classic_export", False)])
def test_a_wrong_scale_fails_validation(request, export, typed, tmp_path, example_dir):
    """Validation must catch a broken graph: one activation scale a third of the way in, multiplied by 4."""
    src = request.getfixturevalue(export)[1] / BACKBONE_FILE
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    scale_name = activations[len(activations) // 3].input[1]
    if scale_name in inits:
        arr = numpy_helper.to_array(inits[scale_name]) * 4
        inits[scale_name].CopyFrom(numpy_helper.from_array(arr, scale_name))
    else:
        const = next(n for n in model.graph.node if scale_name in n.output)
        arr = numpy_helper.to_array(const.attribute[0].t) * 4
        const.attribute[0].t.CopyFrom(numpy_helper.from_array(arr))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    good = ort_session(src)
    _, img, depth = load_inputs(example_dir, SMALL)
    inputs = {"img": img, "depth": depth}
    reference = dict(zip(["camera_feature", "camera_depth_weights"],
                         (torch.from_numpy(a.astype("float32")) for a in good.run(None, feeds(good, inputs)))))
    validate(src, inputs, reference, tolerance("int8", typed))  # the good graph passes against itself
    with pytest.raises(LeanError):
        validate(broken, inputs, reference, tolerance("int8", typed))
