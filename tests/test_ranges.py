"""Range measurement: max |x| of every tensor in FP32, NaN flagged, keys that meet across traces."""

import math

import numpy as np
import torch

from lean.ranges import BOUND, FP16_MAX, Ranges, measure, tensor_key, twin

from helpers import Massive, traced


def test_the_twin_measures_what_fp16_cannot_hold():
    model, weights = traced(Massive(), torch.randn(1, 3, 8))
    x = torch.randn(1, 3, 8)
    ranges = measure(twin(model, weights), [{"x": x.numpy()}, {"x": 2 * x.numpy()}])
    assert ranges.samples == 2 and not ranges.nonfinite
    assert FP16_MAX < ranges.max["/fc1/Add"] < 1.01e5  # the massive channel, in FP32
    assert ranges.max["/norm/LayerNormalization"] < 10  # normalized back
    assert ranges.modules["/fc1/Add"] == "fc1"
    assert ranges.above(BOUND) == {"/fc1/Add": ranges.max["/fc1/Add"]}


def test_nan_and_inf_are_flagged_in_graph_order():
    model, weights = traced(Massive(big=1.0), torch.randn(1, 3, 8))
    x = torch.randn(1, 3, 8).numpy()
    x[0, 0, 3] = np.nan
    ranges = measure(twin(model, weights), [{"x": x}])
    assert ranges.nonfinite[0] == "/fc1/MatMul"  # where it started, though ReduceMax alone skips NaN
    x = torch.randn(1, 3, 8).numpy()
    x[0, 1, 2] = np.inf
    ranges = measure(twin(model, weights), [{"x": x}])
    assert ranges.nonfinite[0] == "/fc1/MatMul" and math.isinf(ranges.max["/fc1/MatMul"])


def test_merge_takes_the_larger_and_ignores_junk():
    ranges = Ranges({"/a": 1.0, "/b": 5.0})
    ranges.merge({"/a": 3.0, "/b": 2.0, "/c": 9.0, "/d": "x"})
    ranges.merge({"/a": float("nan"), "/b": [1]})
    assert ranges.max == {"/a": 3.0, "/b": 5.0}


def test_tensor_keys():
    assert tensor_key("/x/Split", 0) == "/x/Split" and tensor_key("/x/Split", 2) == "/x/Split:2"
