"""lean: export BEVFusion's camera branch to TensorRT-ready ONNX (FP16 and INT8 Q/DQ)."""

__version__ = "0.1.0"
