"""Precision written into the graph itself: FP16 with fp32 islands (fp16.py) and INT8 as explicit Q/DQ (int8.py),
both decided from real pipeline tensors (stats.py: per-tensor ranges over calibration inputs) and checked by
measurement (sensitivity.py). The output is strongly typed: every tensor's type is explicit, so TensorRT 10/11
builds it as is and ONNX Runtime and OpenVINO run it on CPU."""
