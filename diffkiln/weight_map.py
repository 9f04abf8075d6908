"""Map every LoRA-touchable torch weight to the ONNX initializer that holds it.

Exporters rename and transpose weights (a Linear becomes MatMul with a folded `onnx::MatMul_123` = Wᵀ), so names
cannot be trusted; values can. Each torch weight is fingerprinted as is and transposed, and each initializer is
matched by (dtype, shape, content hash) against the torch side's fingerprints (exporter/torch_weights.py).
LoRA folding and TensorRT refit read the result, `weight_map.json`:

    {component: {torch_name: {"initializer": onnx_name, "transposed": bool}}}

Torch names are the diffusers/transformers parameter names (e.g. `down_blocks.0.attentions.0.transformer_blocks.0
.attn1.to_q.weight`, `text_model.encoder.layers.0.self_attn.q_proj.weight`), the names LoRA files refer to.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from diffkiln.onnxio import iter_initializers, load_graph

Key = tuple[str, tuple[int, ...], str]


def content_key(array: np.ndarray) -> Key:
    data = np.ascontiguousarray(array)
    return data.dtype.name, tuple(data.shape), hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def map_weights(onnx_path: Path, keys: dict[Key, list[tuple[str, bool]]]) -> tuple[dict[str, dict], list[str]]:
    """Match initializers against the fingerprints; returns (weight map, torch names left unmapped)."""
    model = load_graph(onnx_path)
    mapping: dict[str, dict] = {}
    for init_name, array in iter_initializers(model, onnx_path.parent):
        for weight, transposed in keys.get(content_key(array), []):
            # two weights may hold the same values: an initializer that carries the weight's name wins
            if weight not in mapping or init_name.endswith(weight):
                mapping[weight] = {"initializer": init_name, "transposed": transposed}
    wanted = {name for entries in keys.values() for name, _ in entries}
    return dict(sorted(mapping.items())), sorted(wanted - mapping.keys())


def follow(mapping: dict[str, dict], old_path: Path, new_path: Path) -> tuple[dict[str, dict], list[str]]:
    """The weight map of a rewritten graph: each mapped initializer is found again in `new_path` by value
    (a pass may rename or move it). Returns (new map, torch names whose weight no longer exists as is)."""
    by_init: dict[str, list[tuple[str, bool]]] = {}
    for weight, entry in mapping.items():
        by_init.setdefault(entry["initializer"], []).append((weight, entry["transposed"]))
    keys: dict[Key, list[tuple[str, bool]]] = {}
    for name, array in iter_initializers(load_graph(old_path), old_path.parent):
        if name in by_init:
            keys.setdefault(content_key(array), []).extend(by_init[name])
    return map_weights(new_path, keys)
