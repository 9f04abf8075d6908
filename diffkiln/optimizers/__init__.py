"""ONNX → ONNX passes per target (ort-cpu | tensorrt) and precision: cleanup, attention/norm/GELU fusion,
LoRA folding, FP16 with fp32 islands, INT8 Q/DQ. Each pass is one small file returning what it changed."""
