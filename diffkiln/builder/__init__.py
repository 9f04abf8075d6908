"""ONNX → TensorRT engines with shape profiles (from each ComponentSpec), timing cache, refit and an engine
manifest (TensorRT version, GPU arch, input hashes). tensorrt is imported lazily: nothing here loads it at import."""
