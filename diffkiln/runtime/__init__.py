"""The slim runtime: tokenizer, samplers, runners (ONNX Runtime, TensorRT) and the txt2img/img2img loop.

Depends only on numpy, onnxruntime, tokenizers and Pillow (tensorrt when present) — never torch, diffusers or
transformers; a test imports it in a fresh interpreter and checks. Arrives with the runtime issue.
"""
