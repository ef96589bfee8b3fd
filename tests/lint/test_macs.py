import numpy as np

from lean.lint.graph import GraphView
from lean.lint.macs import describe, mac_split

from lint.graphs import F16, Builder


def test_mac_split_by_precision():
    b = Builder(F16)
    y = b.conv(b.conv("x"), quantize_input=False, quantize_weight=False)  # one INT8 conv, one FP16 conv
    split = mac_split(GraphView(b.model(y)))
    assert split == {"INT8": 64 * 4 * 36, "FP16": 64 * 4 * 36}
    assert describe(split) == "50.0% in INT8, 50.0% in FP16 of 18.4 kMAC"  # a unit that fits, not 0.0 GMAC
    assert describe({"FP16": 15_100_000_000}).endswith("of 15.1 GMAC")
    assert describe({"FP16": 11_200_000}).endswith("of 11.2 MMAC") and describe({"FP16": 12}).endswith("of 12 MAC")
    assert describe({}) == "no MACs"


def test_gemm_reads_k_from_trans_b():
    b = Builder(F16)
    w = b.const(np.zeros((8, 16)))  # [N, K] with transB
    y = b.node("Gemm", ["x", w], transB=1)
    split = mac_split(GraphView(b.model(y, inputs=(("x", [2, 16]),))))
    assert split == {"FP16": 2 * 8 * 16}
