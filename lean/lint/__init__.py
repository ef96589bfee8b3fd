"""``python -m lean.lint``: will TensorRT run this graph the way we meant? A checker for any ONNX
file (ours, ModelOpt's, CUDA-BEVFusion's): typing for the target, Q/DQ placement, operators and
opset, the runtime's contract, and where the MACs run. Every export runs it on both files."""
