from lean.lint.operators import OPSETS, SUPPORTED_TRT8, UNSUPPORTED_TRT8, known, unsupported


def test_tables():
    assert not SUPPORTED_TRT8 & UNSUPPORTED_TRT8
    assert "LayerNormalization" in unsupported("8") and "LayerNormalization" not in unsupported("10")
    assert "LayerNormalization" in known("11") and {"Conv", "QuantizeLinear", "Resize", "Softmax"} <= known("8")
    assert OPSETS["8"] == (9, 17) and OPSETS["10"][1] == 20
