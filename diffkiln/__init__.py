"""diffkiln: ship Stable Diffusion pipelines as fast, compact ONNX / TensorRT engines.

Data flows one way: sources → exporter → optimizers → builder → runtime. This top-level package imports nothing
heavy: torch, diffusers and transformers are only imported inside `diffkiln.exporter` (and benchmarks).
"""

__version__ = "0.1.0"
