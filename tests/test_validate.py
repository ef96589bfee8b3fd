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


@pytest.mark.parametrize("tol", [FLOAT, INT8, tolerance("fp16", True)])
def test_nan_or_inf_never_passes(tol):
    ref = torch.linspace(-1, 1, 100)
    for bad in (float("nan"), float("inf")):
        got = ref.clone()
        got[7] = bad
        stats = compare(got, ref, tol)
        assert not stats["ok"] and stats["nonfinite"] == 1 and "1 of 100 elements are NaN or Inf" in stats["failed"]
        stats = compare(ref, got, tol)  # a broken reference fails too, with its own message
        assert not stats["ok"] and "reference holds 1 NaN or Inf" in stats["failed"]


def test_a_nan_output_names_the_first_node_that_made_it(small_int8_export, tmp_path, example_dir):
    """A bias turned to NaN in the depth head's last conv: the message names that node, not a cosine.
    (NaN in an earlier layer would reach no output: the next QuantizeLinear maps it to an integer.)"""
    src = small_int8_export[1] / BACKBONE_FILE
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    bias = inits["vtransform.depthnet.6.bias"]
    arr = numpy_helper.to_array(bias).copy()
    arr[0] = float("nan")
    bias.CopyFrom(numpy_helper.from_array(arr, bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    good = ort_session(src)
    _, img, depth = load_inputs(example_dir, SMALL)
    inputs = {"img": img, "depth": depth}
    ref = dict(zip([o.name for o in good.get_outputs()], map(torch.from_numpy, good.run(None, feeds(good, inputs)))))
    with pytest.raises(LeanError) as e:
        validate(broken, inputs, ref, tolerance("int8", True), BACKBONE_FILE)
    text = str(e.value)
    assert "NaN or Inf" in text and "first made by /vtransform/depthnet/depthnet.6/Conv" in text
    assert "module vtransform.depthnet.6" in text


def test_check_reference_names_the_first_module_with_inf():
    from lean.validate import check_reference

    branch = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with torch.no_grad():
        branch[0].bias.fill_(3e38)
        branch[2].weight.fill_(10.0)
    x = {"x": torch.ones(1, 4)}
    out = {"y": branch(x["x"])}
    with pytest.raises(LeanError) as e:
        check_reference(out, branch, x, "graph", branch)
    assert "first in module 2 (4 of 4 values)" in str(e.value)
    fine = {"y": torch.ones(2)}
    assert check_reference(fine, branch, x, "graph", branch) is fine
