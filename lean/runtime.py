"""ONNX Runtime as the project runs a graph: a CPU session that computes what the graph says,
fed in the types the graph declares. Used by the validation and the range measurement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


# ORT's basic level rewrites a float conv bias behind Q/DQ'd input and weight into an int32 bias
# with scale = input scale x weight scale. With FP16 scales that product is often subnormal in
# FP16, and the biases come out wrong (typed demo INT8 backbone: cosine 0.966 with it, 0.982
# without). The graph says float bias; TensorRT adds it in float.
ORT_DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


def ort_session(path: Path | bytes, in_node_order: bool = False):
    """An ONNX Runtime CPU session that computes what the graph says.

    ``in_node_order``: run the nodes in the file's order where the graph allows (ORT's priority-based
    order); the range measurement places each reduction right after its tensor's producer, and in
    ORT's default order the tensors waited for their reductions to the end (3.0 GB peak instead of
    1.4 GB on the full-size demo backbone).

    Basic optimizations only: ORT's extended level fuses Q/DQ pairs into its own int8 kernels
    (QLinearConv), whose x86 s8s8 path saturates intermediate sums (errors of half the output
    range were seen on ResNet50's downsample convs). TensorRT accumulates exactly in int32, so
    the unfused Q -> DQ -> float conv semantics are the right reference.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.enable_cpu_mem_arena = False  # one run per session: an arena only raises the export's peak memory
    if in_node_order:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=ORT_DISABLED_OPTIMIZERS)


def feeds(session, tensors: dict[str, torch.Tensor]) -> dict:
    """Numpy inputs for ``session``, each in the type its graph input declares (FP16 or FP32)."""
    dtypes = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
    return {k: v.detach().cpu().numpy().astype(dtypes[k]) for k, v in tensors.items()}
