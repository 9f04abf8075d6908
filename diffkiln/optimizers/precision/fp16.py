"""FP16 with fp32 islands chosen by measurement.

Pattern: every float tensor and weight becomes fp16, except the *islands*, which stay fp32 with explicit Casts at
their borders (a strongly typed graph: TensorRT builds it as written, ORT and OpenVINO run it on CPU):
- nodes whose output magnitude on real calibration inputs leaves fp16's safe range (|x| > `data_max`, a margin
  below fp16's 65504 for inputs calibration did not see), and the nodes that read such a tensor;
- normalization and its statistics (Instance/Group/LayerNormalization, ReduceMean, Pow, Sqrt): in a strongly typed
  network they compute in their input's type, and a variance over thousands of values overflows fp16;
- anything the fp16 graph itself shows non-finite on the calibration inputs (found by running it: the first
  overflowing nodes join the islands and the graph is converted again).
Graph inputs and outputs stay fp32 (Casts at the borders) unless `fp16_io`. ONNX Runtime's float16 converter
(onnxruntime.transformers.float16) writes the casts; this module decides what it must not convert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from diffkiln.errors import DiffkilnError, library_errors
from diffkiln.optimizers.precision import stats

FP16_MAX = 65504.0
DATA_MAX = 8192.0  # an 8× margin below FP16_MAX
NORMALIZATION = {
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "ReduceSumSquare",
    "ReduceL2",
}
MAX_ROUNDS = 4  # convert → run → add the overflowing nodes → convert again, at most this often


def name_nodes(model: onnx.ModelProto) -> None:
    """Give nameless nodes unique names: the islands are node names."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
            while node.name in seen:
                node.name += "_"
            seen.add(node.name)


def producers(model: onnx.ModelProto) -> dict[str, str]:
    return {out: n.name for n in model.graph.node for out in n.output if out}


def islands_from_ranges(model: onnx.ModelProto, amax: dict[str, float], data_max: float) -> dict[str, str]:
    """node → why it stays fp32: its outputs' calibrated magnitude, or its kind."""
    made_by = producers(model)
    data_max = min(data_max, FP16_MAX)  # past fp16's largest value is an overflow, whatever the caller asked
    kept = {}
    nodes = {n.name: n for n in model.graph.node}
    for node in model.graph.node:
        if node.op_type in NORMALIZATION:
            kept[node.name] = f"{node.op_type}: normalization statistics"
            # T5's RMS norm casts to fp32 before its Pow: that Cast joins the island (converted, ORT's float16
            # converter leaves the Pow reading fp16, and the graph does not load)
            for name in node.input:
                if name in made_by and nodes[made_by[name]].op_type == "Cast":
                    kept.setdefault(made_by[name], "Cast into normalization statistics")
    users: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node.name)
    for tensor, value in amax.items():
        node = made_by.get(tensor)
        if node is None or not value > data_max:
            continue
        # its producer and every consumer: a Cast to fp16 at either end of the tensor would overflow as well
        kept.setdefault(node, f"output |x| up to {value:.4g} > {data_max:g} on calibration inputs")
        for user in users.get(tensor, []):
            kept.setdefault(user, f"input |x| up to {value:.4g} > {data_max:g} on calibration inputs")
    return kept


def convert(src_model: onnx.ModelProto, islands: list[str], fp16_io: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
    model = onnx.ModelProto()
    model.CopyFrom(src_model)
    _unshare_initializers(model, set(islands))
    del model.graph.value_info[:]
    model.graph.value_info.extend(stats.inferred_value_info(src_model))  # the converter's own fails past 2 GB
    with library_errors("cannot convert the graph to fp16", "keep it in --precision fp32"):
        converted = convert_float_to_float16(
            model,
            keep_io_types=not fp16_io,
            disable_shape_infer=True,
            op_block_list=DEFAULT_OP_BLOCK_LIST,
            node_block_list=islands,
        )
    _drop_round_trips(converted)
    return converted


def _drop_round_trips(model: onnx.ModelProto) -> int:
    """Remove Cast(fp32→fp16) → Cast(fp16→fp32) pairs: the converter puts them between two fp32 islands, where
    they would overflow exactly the values the islands exist for. Dropping one only adds precision."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    dead = set()
    for node in model.graph.node:
        first = made_by.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if (
            first is not None
            and first.op_type == "Cast"
            and _cast_to(node) == onnx.TensorProto.FLOAT
            and _cast_to(first) == onnx.TensorProto.FLOAT16
            and node.output[0] not in outputs
        ):
            rename[node.output[0]] = first.input[0]
            dead.add(id(node))
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in model.graph.node if id(n) not in dead for i in n.input} | outputs
    keep = [n for n in model.graph.node if id(n) not in dead]
    keep = [n for n in keep if n.op_type != "Cast" or any(o in used for o in n.output)]
    removed = len(model.graph.node) - len(keep)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return removed


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _unshare_initializers(model: onnx.ModelProto, islands: set[str]) -> None:
    """Give island nodes their own copy of every initializer they share with converted nodes: the converter
    turns a shared initializer to fp16 for all its users, and the fp32 island would then get an fp16 input."""
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                users.setdefault(name, set()).add(node.name in islands)
    shared = {name for name, kinds in users.items() if kinds == {True, False}}
    for name in shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = name + "__fp32"
        model.graph.initializer.append(copy)
    for node in model.graph.node:
        if node.name in islands:
            for i, name in enumerate(node.input):
                if name in shared:
                    node.input[i] = name + "__fp32"


def to_fp16(
    src: Path,
    dst: Path,
    feeds: list[dict[str, np.ndarray]],
    save: Callable[[onnx.ModelProto, Path], None],
    *,
    data_max: float = DATA_MAX,
    fp16_io: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Convert `src` (fp32) into `dst`; returns the island record {node: reason}. `save(model, path)` writes a
    graph (external data for big ones)."""
    graph = onnx.load(str(src), load_external_data=False)
    name_nodes(graph)
    floats = stats.float_tensors(graph)
    del graph
    named = dst.with_name("named.onnx")
    model = onnx.load(str(src))
    name_nodes(model)
    save(model, named)
    log(f"  fp16: measuring {len(floats)} tensors on {len(feeds)} calibration inputs")
    per_sample = stats.amax_per_sample(named, floats, feeds, log)
    amax = {t: float(v.max()) if v.size else 0.0 for t, v in per_sample.items()}
    islands = islands_from_ranges(model, amax, data_max)
    for round_ in range(1, MAX_ROUNDS + 1):
        converted = convert(model, list(islands), fp16_io)
        save(converted, dst)
        del converted
        bad = _overflows(dst, feeds, amax)
        if not bad:
            break
        made_by = producers(model)
        new = {made_by[t] for t in bad} - set(islands)
        if not new or round_ == MAX_ROUNDS:
            raise DiffkilnError(
                f"{src}: fp16 still overflows in {', '.join(sorted(bad)[:3])} after {round_} rounds of fp32 "
                "islands; keep this component in fp32 (--components)"
            )
        for node in new:
            islands[node] = "overflowed in the fp16 graph on calibration inputs"
        log(f"  fp16: round {round_}: {len(new)} overflowing node(s) kept in fp32, converting again")
    named.unlink(missing_ok=True)
    for extra in named.parent.glob(named.name + ".data"):
        extra.unlink()
    log(f"  fp16: {len(islands)} of {len(model.graph.node)} nodes kept in fp32")
    return {"data_max": data_max, "islands": islands, "nodes": len(model.graph.node)}


def _overflows(path: Path, feeds: list[dict[str, np.ndarray]], reference: dict[str, float]) -> list[str]:
    """When the fp16 graph at `path` gives a non-finite output on a feed: the tensors of the fp32 graph that were
    finite there (`reference`: their fp32 amax) and are not in fp16, first in graph order. A mask's -inf is no
    overflow while the outputs stay finite, so nothing is searched then."""
    model = onnx.load(str(path), load_external_data=False)
    outputs = [o.name for o in model.graph.output]
    floats = stats.float_tensors(model)
    order = [o for n in model.graph.node for o in n.output if o in floats and o in reference]
    del model
    per_output = stats.amax_per_sample(path, [o for o in outputs if o in floats or o in reference], feeds)
    if all(np.isfinite(v).all() for v in per_output.values()):
        return []
    per_sample = stats.amax_per_sample(path, order, feeds)
    return [t for t in order if np.isfinite(reference[t]) and not np.isfinite(per_sample[t]).all()][:8]
