"""Map every LoRA-touchable torch weight to the ONNX initializer that holds it.

Exporters rename and transpose weights (a Linear becomes MatMul with a folded `onnx::MatMul_123` = Wᵀ), so names
cannot be trusted; values can. Each torch weight is fingerprinted as is and transposed, and each initializer is
matched by (dtype, shape, content hash) against the torch side's fingerprints (exporter/torch_weights.py).
LoRA folding and TensorRT refit read the result, `weight_map.json`:

    {component: {torch_name: {"initializer": onnx_name, "transposed": bool}}}

Torch names are the diffusers/transformers parameter names (e.g. `down_blocks.0.attentions.0.transformer_blocks.0
.attn1.to_q.weight`, `text_model.encoder.layers.0.self_attn.q_proj.weight`), the names LoRA files refer to.

A graph exported elsewhere (an optimum folder) comes without its torch weights, so `map_from_graph` reads the same
map off the graph itself: torch's exporter keeps a weight's name on the initializer a Conv, Gemm or Gather uses
as is, and names each node after its module scope (`/down_blocks.0/…/attn1/to_q/MatMul`), so the Wᵀ a MatMul
multiplies by belongs to `down_blocks.0.….attn1.to_q.weight`. On diffkiln's own exports it gives the value-matched
map exactly (tests/test_interop.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from diffkiln.onnxio import iter_initializers, load_graph

Key = tuple[str, tuple[int, ...], str]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def torch_name(component: str, name: str) -> str:
    """The parameter name as checkpoints and LoRA files spell it, whatever the library version: the wrapper's
    `model.` prefix removed, and CLIP weights under `text_model.` (transformers 5 flattened CLIPTextModel)."""
    if component in ("unet", "transformer", *TEXT_ENCODERS):
        name = name.removeprefix("model.")
    t5 = name.startswith(("shared.", "encoder.block.", "encoder.final_layer_norm."))  # Flux's text_encoder_2
    if component in TEXT_ENCODERS and not t5 and not name.startswith(("text_model.", "text_projection.")):
        name = "text_model." + name
    return name


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


# op → index of its weight input, for the layers LoRAs touch (Linear, Conv2d, token Embedding)
_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}


def map_from_graph(onnx_path: Path, component: str) -> dict[str, dict]:
    """The weight map of a torch-exported graph read from its names alone (see the module docstring)."""
    graph = load_graph(onnx_path).graph
    shapes = {t.name: len(t.dims) for t in graph.initializer}
    mapping: dict[str, dict] = {}
    for node in graph.node:
        index = _WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in shapes:
            continue
        init = node.input[index]
        named = init.endswith(".weight") and not init.startswith("onnx::")
        if node.op_type == "Gather":
            if named and init.endswith("token_embedding.weight"):
                mapping[torch_name(component, init)] = {"initializer": init, "transposed": False}
        elif named and (node.op_type != "Gemm" or _attribute(node, "transB") == 1):
            mapping[torch_name(component, init)] = {"initializer": init, "transposed": False}
        elif node.op_type == "MatMul" and shapes[init] == 2 and node.name.startswith("/"):
            scope = node.name.strip("/").split("/")[:-1]  # /a/b.0/c/MatMul → a.b.0.c
            if scope:
                mapping[torch_name(component, ".".join(scope)) + ".weight"] = {"initializer": init, "transposed": True}
    return dict(sorted(mapping.items()))


def _attribute(node, name: str):
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return None
