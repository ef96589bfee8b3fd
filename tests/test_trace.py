import torch

from lean.trace import annotate, exact_float32, trace


def test_trace_names_the_graph_and_keeps_the_tracing_forward():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    proto, reference = trace(module, {"img": x}, ["feat"], opset=13)
    assert [i.name for i in proto.graph.input] == ["img"] and [o.name for o in proto.graph.output] == ["feat"]
    assert proto.opset_import[0].version == 13
    with torch.no_grad():
        assert torch.equal(reference["feat"], module(x))
    assert not reference["feat"].requires_grad


def test_annotate_replaces_metadata():
    proto, _ = trace(torch.nn.ReLU(), {"x": torch.randn(2)}, ["y"], opset=13)
    annotate(proto, {"a": 1})
    annotate(proto, {"precision": "int8"})
    assert proto.producer_name == "lean"
    assert {p.key: p.value for p in proto.metadata_props} == {"precision": "int8"}


def test_exact_float32_restores_the_flags():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with exact_float32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
