import logging
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from lean.report import ExportReport, GraphResult, Stages, qdq_pairs, summary_table


def test_qdq_pairs_counts_activation_pairs_and_weight_dequantizes():
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    w = numpy_helper.from_array(np.zeros((2,), np.int8), "w")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("DequantizeLinear", ["w", "s", "z"], ["dw"]),  # weight: no Quantize before it
             helper.make_node("Add", ["dq", "dw"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [scale, zero, w])
    assert qdq_pairs(helper.make_model(graph)) == 2


def test_summary_table(tmp_path):
    g = GraphResult("camera.backbone.onnx", size=3 * 1024 * 1024, nodes=149, qdq_pairs=0, seconds=2.5,
                    outputs={"a": {"max_abs_err": 1e-5, "cosine": 0.9999999, "tolerance": 1e-4, "min_cosine": 0.9995},
                             "b": {"max_abs_err": 3e-5, "cosine": 1.0, "tolerance": 1e-3, "min_cosine": 0.9995}})
    report = ExportReport(Path("out"), "fp16", [g], {}, {"bev_check": {"seconds": 0.4, "max_abs_err": 2e-4, "cosine": 1.0,
                                                                      "tolerance": 1e-2, "min_cosine": 0.999}})
    lines = summary_table(report).splitlines()
    assert lines[0].split() == ["file", "size", "nodes", "Q/DQ", "time", "max", "error", "(bound)", "cosine", "(bound)"]
    # Each figure with the bound it passed against: the error nearest its bound, the lowest cosine.
    assert lines[2].split() == ["out/camera.backbone.onnx", "3.0", "MB", "149", "0", "2.5s", "1e-05", "<=", "0.0001",
                                "1.000000", ">=", "0.9995"]
    assert lines[3].startswith("BEV map")
    assert report.to_json()["files"]["camera.backbone.onnx"]["nodes"] == 149
    island = {"file": "camera.backbone.onnx", "nodes": ["/backbone/layer3/layer3.2/conv2/Conv", "/x/Relu"],
              "tensor": "/backbone/layer3/layer3.2/conv2/Conv", "max": 1.0e5, "bound": 8192.0, "keep_fp32": []}
    report.facts["target"] = {"tensorrt": "10", "runtimes": "TensorRT 10", "typing": "strongly typed", "io": "fp16",
                              "fp32_islands": [island], "fp32_bound": 8192.0, "keep_fp32": []}
    text = summary_table(report)
    assert "FP32 islands: 1 (tensors above max |x| 8192 measured in FP32 on the data)" in text
    assert "camera.backbone.onnx: 2 nodes from /backbone/layer3/layer3.2/conv2/Conv: " \
           "/backbone/layer3/layer3.2/conv2/Conv max |x| 1e+05" in text


def test_a_nan_figure_is_never_written():
    from lean.errors import LeanError
    from lean.report import report_text

    g = GraphResult("camera.backbone.onnx", outputs={"a": {"max_abs_err": 1e-5, "cosine": 1.0}})
    assert '"cosine": 1.0' in report_text(ExportReport(Path("out"), "fp16", [g], {}, {}))
    g.outputs["a"]["cosine"] = float("nan")
    with pytest.raises(LeanError) as e:
        report_text(ExportReport(Path("out"), "fp16", [g], {}, {}))
    assert "NaN or infinite" in str(e.value)


def test_stages_time_and_log(caplog):
    stages = Stages()
    with caplog.at_level(logging.INFO, logger="lean"):
        with stages("export", "tracing"):
            pass
        with stages("export", "tracing again"):
            pass
    assert [r.getMessage() for r in caplog.records] == ["[1] tracing ...", "[2] tracing again ..."]
    assert list(stages.times) == ["export"] and stages.times["export"] >= 0
