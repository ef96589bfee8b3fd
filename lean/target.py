"""Which TensorRT a graph is for: typed or classic graph, opset, and the command that builds it.

- TensorRT 10 and 11 (default): strongly typed graphs. TensorRT 11 builds nothing else (its
  FP16/INT8 builder flags are gone) and 10 does with ``--stronglyTyped``, so the precision is
  written into the file: FP16 tensors, FP16 I/O, INT8 as Q/DQ with FP16 scales (opset >= 19, the
  first where Q/DQ take FP16).
- TensorRT 8.5/8.6 (JetPack 5 / 6.0): the classic graph, FP32 tensors and opset-13 Q/DQ, which the
  builder turns into FP16/INT8 with ``--fp16 --int8``; it parses opsets up to 17 and knows no
  strong typing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lean.errors import LeanError


@dataclass(frozen=True)
class Target:
    name: str  # what --tensorrt takes
    typed: bool  # strongly typed graph (precision in the file) or classic (FP32 tensors, builder flags)
    opset: int  # default
    opsets: tuple[int, int]  # the range this target's parser takes and the exporter writes
    runtimes: str  # who runs it, for --help and the README

    @property
    def typing(self) -> str:
        return "strongly typed" if self.typed else "classic FP32 (precision from builder flags)"

    def check_opset(self, opset: int) -> None:
        lo, hi = self.opsets
        if not lo <= opset <= hi:
            why = "Q/DQ with FP16 scales need opset 19" if self.typed else "TensorRT 8 parses opsets 13 to 17"
            raise LeanError(f"--opset {opset} does not fit --tensorrt {self.name}: choose {lo} to {hi} ({why})")

    def build_command(self, onnx_path: Path, inputs: int, outputs: int, precision: str,
                      fp32_layers: list[str] = ()) -> str:
        """The trtexec command that builds ``onnx_path`` into an engine beside it, with the layer
        information and profile users of this field read (layers named by module, ``lean.names``).
        ``precision``: what the file holds ("int8" only for a file with Q/DQ: on TensorRT 8,
        ``--int8`` on a graph without Q/DQ builds with placeholder ranges). ``fp32_layers``: a
        classic graph's FP32 islands (a typed graph holds its islands in the file)."""
        stem = onnx_path.with_suffix("")
        cmd = (f"trtexec --onnx={onnx_path} --saveEngine={stem}.plan --profilingVerbosity=detailed --dumpLayerInfo "
               f"--dumpProfile --exportLayerInfo={stem}.layers.json --exportProfile={stem}.profile.json")
        if self.name == "10":
            return cmd + " --stronglyTyped"
        if self.typed:
            return cmd
        # CUDA-BEVFusion's tool/build_trt_engine.sh: FP16 bindings, chw layout.
        flags = " --fp16" + (" --int8" if precision == "int8" else "")
        if fp32_layers:  # TensorRT 8.5+: per-layer precision, layers named after the ONNX nodes
            spec = ",".join(f"{name}:fp32" for name in fp32_layers)
            flags += f" --precisionConstraints=obey '--layerPrecisions={spec}' '--layerOutputTypes={spec}'"
        return (cmd + flags + " --inputIOFormats=" + ",".join(["fp16:chw"] * inputs)
                + " --outputIOFormats=" + ",".join(["fp16:chw"] * outputs))


TARGETS = {
    "10": Target("10", True, 19, (19, 20), "TensorRT 10.x (JetPack 6.1/6.2: 10.3) and 11.x"),
    "11": Target("11", True, 19, (19, 20), "TensorRT 11.x"),
    "8": Target("8", False, 13, (13, 17), "TensorRT 8.5/8.6 (JetPack 5, JetPack 6.0)"),
}
DEFAULT_TARGET = "10"


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise LeanError(f"unknown --tensorrt {name!r}: choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
