"""Test helpers shared by several test files (the fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lean.config import CameraConfig

SMALL = CameraConfig(cameras=2, image_size=(64, 176))
ROOT = Path(__file__).resolve().parents[1]


def float_ckpt(folder, example_dir, cfg):
    """A demo float checkpoint (official layout) of ``cfg`` in ``folder``."""
    from lean.checkpoint import save_official
    from lean.data import load_example
    from lean.scene import make_demo_model

    sample = load_example(example_dir, image_size=cfg.image_size, cameras=cfg.cameras)
    path = Path(folder) / f"{cfg.backbone}-{cfg.image_size[0]}x{cfg.image_size[1]}.pth"
    save_official(path, make_demo_model(cfg, sample).state_dict())
    return path


def python(*args, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    """``python ARGS`` in a child process, as a user runs it from ``cwd``, with the project importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def random_bn(model):
    """Random BN statistics and affine parameters (in place), so folding them is really tested."""
    torch.manual_seed(3)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.1, 0.1)
    return model


def sample_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, n, (h, w) = 1, cfg.cameras, cfg.image_size
    img = torch.randn(b, n, 3, h, w, generator=g)
    depth = torch.rand(b, n, 1, h, w, generator=g) * 50 * (torch.rand(b, n, 1, h, w, generator=g) > 0.97)
    return img, depth


def onnx_io(path) -> dict[str, list[int]]:
    """Input and output names of an ONNX file with their static shapes."""
    import onnx

    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(graph.input) + list(graph.output)}


def one_line(excinfo) -> str:
    """The text of a ``pytest.raises`` LeanError, checked to be one non-empty line."""
    text = str(excinfo.value)
    assert text and "\n" not in text
    return text


def planted(src, dst, **edits):
    """A copy of the float checkpoint ``src`` with ``edits`` (key with '__' for '.', -> a function
    of the tensor giving the new tensor) applied: how trained networks look where a few channels
    carry huge activations (a SwinT residual stream at 1e5, a ResNet pre-activation past FP16's
    range whose next layer has small weights for it)."""
    from lean.checkpoint import read_checkpoint, save_official

    sd = dict(read_checkpoint(src).state_dict)
    for key, edit in edits.items():
        key = key.replace("__", ".")
        sd[key] = edit(sd[key].clone())
    save_official(dst, sd)
    return dst


def setting(index, value):
    """An edit for ``planted``: ``t[index] = value``."""
    def edit(t):
        t[index] = value
        return t
    return edit


def scaling(index, factor):
    """An edit for ``planted``: ``t[index] *= factor``."""
    def edit(t):
        t[index] *= factor
        return t
    return edit


MASSIVE_SWINT = {"backbone__stages__2__blocks__0__ffn__layers__1__bias": setting([5, 77, 300], 1e5)}
BIG_RESNET = {"backbone__layer3__2__bn2__bias": setting([7], 1e5),
              "backbone__layer3__2__conv3__weight": scaling((slice(None), 7), 1e-5)}


class Massive(torch.nn.Module):
    """x -> fc1 (one output channel's bias at 1e5: a massive activation) -> LayerNorm -> fc2."""

    def __init__(self, big: float = 1e5):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.fc1.bias[0] = big

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def traced(module, x, dtype=torch.float16):
    """(ir model of ``module`` traced in ``dtype`` and named as the export names, its FP32 weights by name)."""
    from lean.names import name_nodes, scope_map
    from lean.simplify import simplify
    from lean.trace import trace

    import copy

    weights = {k: v.detach().float().numpy() for k, v in module.state_dict().items()}
    module = copy.deepcopy(module).to(dtype).eval()
    model = trace(module, {"x": x.to(dtype)}, ["y"], 19)
    simplify(model)
    name_nodes(model, scope_map(module, module))
    return model, weights


def run_onnx(proto, x):
    """ONNX Runtime's output of a one-input graph (the input in the graph's type), as float32."""
    import numpy as np

    from lean.validate import ort_session

    session = ort_session(proto.SerializeToString())
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    return session.run(None, {"x": x.numpy().astype(dtype)})[0].astype(np.float32)


def _weight_module(graph, node) -> str | None:
    """The module path of a MAC node's weight: its initializer's key less '.weight' (through the
    weight's DequantizeLinear, QuantizeLinear and Transpose)."""
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    name = node.input[1]
    while name not in inits and name in producers:
        name = producers[name].input[0]
    for suffix in (".weight", ".weight.T"):  # .weight.T: a Linear weight the optimizer transposed
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def assert_named_by_module(path) -> int:
    """Every node of the ONNX file ``path`` named after its module (``lean.names``), uniquely; every
    Conv/MatMul/Gemm with a weight named by its weight's module. Returns how many such layers."""
    import onnx

    from lean.names import MODULE, scoped_name

    graph = onnx.load(str(path)).graph
    names = [n.name for n in graph.node]
    assert len(set(names)) == len(names) and all(n.startswith("/") for n in names)
    macs = 0
    for node in graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        assert node.name.startswith(scoped_name(meta[MODULE], "")) and "pkg.torch.onnx.name_scopes" in meta
        assert not any("stack_trace" in k for k in meta)
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            module = _weight_module(graph, node)
            if module is not None:  # attention's activation x activation matmuls have no weight
                macs += 1
                assert node.name == scoped_name(module, node.op_type), node.name
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not node.input[0].endswith(".weight"):
            assert "_quantizer/" in node.name or "quant_concat" in node.name, node.name
    assert all(not i.name.startswith(("branch.", "downsample.", "inner.")) for i in graph.initializer)
    return macs


POLYGRAPHY = Path(sys.executable).parent / "polygraphy"


def polygraphy_onnxrt(graph, folder, reference=None, timeout=300) -> subprocess.CompletedProcess:
    """The export's engine check command for one graph (``GraphResult``) run by Polygraphy with
    ONNX Runtime in place of TensorRT (the ONNX file in place of the plan). A classic graph's file
    takes FP32 where its engine binds FP16: it gets the same inputs cast to FP32.
    ``reference``: another --load-outputs file."""
    import shlex

    import numpy as np
    import onnx
    from polygraphy.json import load_json, save_json

    args = shlex.split(graph.engine_check["onnxrt_command"])
    assert args[:2] == ["polygraphy", "run"] and "--onnxrt" in args
    inputs = Path(args[args.index("--load-inputs") + 1])
    assert inputs.parent == Path(folder)
    declared = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(Path(folder) / graph.file), load_external_data=False).graph.input}
    if any(t == onnx.TensorProto.FLOAT for t in declared.values()) and graph.engine_check["binding"] == "float16":
        cast = Path(folder) / (inputs.name + ".fp32")
        save_json([{k: v.astype(np.float32) for k, v in feed.items()} for feed in load_json(str(inputs))], str(cast))
        args[args.index("--load-inputs") + 1] = str(cast)
    if reference is not None:
        args[args.index("--load-outputs") + 1] = str(reference)
    return subprocess.run([str(POLYGRAPHY), *args[1:]], capture_output=True, text=True, timeout=timeout, cwd=folder)


def default_sigint():
    """``preexec_fn`` of a child that a test interrupts with SIGINT: a shell's background job (how
    CI may start the tests) ignores SIGINT, its children inherit that, and Python then installs no
    KeyboardInterrupt handler. A user's Ctrl-C reaches a foreground process with the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
