"""ONNX file I/O that is safe for models over protobuf's 2 GB limit.

Graphs over 2 GB keep their weights in one `model.onnx.data` file beside `model.onnx`; everything here reads
and writes that layout by streaming tensors, never holding a second copy of the weights in memory.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from diffkiln.kiln_reader import inside

DATA_SUFFIX = ".data"
ALIGN = 4096  # page-aligned tensors let ONNX Runtime memory-map them


def load_graph(path: Path) -> onnx.ModelProto:
    """The model without its external weights (cheap even for a 10 GB UNet)."""
    return onnx.load(str(path), load_external_data=False)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def iter_initializers(model: onnx.ModelProto, base: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every initializer, external ones read one at a time from disk."""
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            yield t.name, onnx.numpy_helper.to_array(t)
            continue
        info = _external_info(t)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        with open(inside(base, info["location"], f"{base.name}: external data of {t.name}"), "rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            length = int(info["length"]) if "length" in info else -1
            raw = fh.read(length)
        yield t.name, np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims))


def consolidate_external_data(path: Path) -> bool:
    """Rewrite per-tensor external files (what torch's exporter writes past 2 GB) into one aligned
    `<model>.onnx.data`, streaming tensor by tensor. Returns whether the model has external data."""
    model = load_graph(path)
    if not has_external_data(model):
        return False
    base, data_name = path.parent, path.name + DATA_SUFFIX
    tmp = base / (data_name + ".tmp")
    old_files = set()
    with open(tmp, "wb") as out:
        for t in model.graph.initializer:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            info = _external_info(t)
            src = base / info["location"]
            with open(src, "rb") as fh:
                fh.seek(int(info.get("offset", 0)))
                raw = fh.read(int(info["length"]) if "length" in info else -1)
            if info["location"] != data_name:
                old_files.add(src)
            offset = out.tell()
            pad = -offset % ALIGN
            out.write(b"\0" * pad)
            offset += pad
            out.write(raw)
            del t.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=key, value=value)
    os.replace(tmp, base / data_name)
    for f in old_files - {base / data_name}:
        f.unlink(missing_ok=True)
    onnx.save(model, str(path))
    return True


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type (with domain prefix for non-standard domains), subgraphs included."""
    counts: Counter[str] = Counter()

    def walk(graph):
        for node in graph.node:
            counts[f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)

    walk(model.graph)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def io_shapes(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """Graph inputs/outputs with symbolic dims as strings."""

    def describe(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims})
        return out

    inits = {t.name for t in model.graph.initializer}
    return {
        "inputs": describe(v for v in model.graph.input if v.name not in inits),
        "outputs": describe(model.graph.output),
    }


def stamp_io_shapes(path: Path, shapes: dict[str, tuple[int | str, ...]]) -> None:
    """Write the contract's shapes onto the graph's inputs/outputs (exporters leave names like
    `LayerNormalization_dim_1` where the contract says 77), keeping external data where it is."""
    model = load_graph(path)
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in shapes[value.name]:
            dim = dims.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d
    onnx.save(model, str(path))
