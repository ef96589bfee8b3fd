"""INT8 quantization: ``qdq`` (the exported Q/DQ model, no ModelOpt), ``modelopt`` (placement and
the calibration loop on NVIDIA ModelOpt) and ``calib`` (the statistics and amax searches)."""
