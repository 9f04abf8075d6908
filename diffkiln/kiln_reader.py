"""Reading an untrusted kiln directory: manifest schema, path confinement, ONNX external-data locations.

A kiln dir is something users download and unpack from others, like a checkpoint. Before any stage uses one,
`read_manifest` proves that

- `manifest.json` is an object of the schema below (types, required keys, known components, sane numbers);
- every path it names (component graphs and their files, tokenizer folders, the scheduler config) resolves —
  symlinks followed — inside the kiln dir, and every symlink in those folders stays inside it too;
- every recorded file exists with its recorded size (a truncated or swapped download is caught here);
- every ONNX external-data `location` in a component's graph resolves inside that component's folder, checked
  by scanning the protobuf wire format *before* onnx or ONNX Runtime open the file (both follow locations).

A folder without `manifest.json` that `optimum-cli export onnx` wrote (model_index.json + unet/model.onnx) is
read as a kiln dir too: interop.py makes its manifest from its configs and graphs, then it is checked like any
(`kiln.read_manifest` dispatches; this module knows only diffkiln's own layout).

Anything else is a one-line KilnError naming the entry. Pure Python: the slim runtime reads kilns through this.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from pathlib import Path

from diffkiln.errors import KilnError
from diffkiln.specs import CONTRACTS

MANIFEST = "manifest.json"
WEIGHT_MAP = "weight_map.json"
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "transformer", "vae_decoder", "vae_encoder")
PIPELINE_KINDS = ("sd1", "sd2", "sdxl", "flux")
MAX_MANIFEST_BYTES = 64 << 20

# pipeline field: (type, min, max); the ranges hold every SD1/2/XL-family model with a wide margin
_PIPELINE = {
    "kind": (str, None, None),
    "vocab_size": (int, 1, 1 << 24),
    "eos_token_id": (int, 0, 1 << 24),
    "cross_attention_dim": (int, 1, 1 << 16),
    "latent_channels": (int, 1, 64),
    "text_embeds_dim": (int, 0, 1 << 16),
    "time_ids_dim": (int, 0, 64),
    "sample_size": (int, 2, 1024),
    "num_down": (int, 0, 8),
    "scaling_factor": (float, 1e-6, 1e3),
    "prediction_type": (str, None, None),
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
# Flux's fields, checked when present (kiln dirs of SD pipelines do not have them)
_OPTIONAL = {
    "text_sequence": (int, 0, 4096),
    "t5_vocab_size": (int, 0, 1 << 24),
    "shift_factor": (float, -1e3, 1e3),
}


def inside(root: Path, rel, what: str) -> Path:
    """`root/rel` when `rel` is a relative path that stays inside `root` once resolved (symlinks followed)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise KilnError(f"{what} is not a file name ({rel!r}); the kiln dir is damaged or crafted: do not use it")
    path = Path(rel)
    base = Path(root).resolve()
    if path.is_absolute() or not (base / path).resolve().is_relative_to(base):
        raise KilnError(
            f"{what} points outside {root} ({rel!r}); a kiln dir may only name files inside itself: do not use it"
        )
    return Path(root) / path


def check_tree(kiln_dir: Path, folder: Path) -> None:
    """No symlink under `folder` may lead outside the kiln dir (copying it would read a foreign file)."""
    base = Path(kiln_dir).resolve()
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() and not path.resolve().is_relative_to(base):
                raise KilnError(
                    f"{path} is a link to {os.readlink(path)}, outside {kiln_dir}: do not use this kiln dir"
                )


def read_manifest(kiln_dir: Path, *, check_files: bool = True) -> dict:
    """The validated manifest of `kiln_dir` (see the module docstring); `check_files=False` skips the files."""
    kiln_dir = Path(kiln_dir)
    path = kiln_dir / MANIFEST
    if not kiln_dir.is_dir():
        raise KilnError(f"no such kiln directory: {kiln_dir}; create one with `diffkiln export SOURCE -o {kiln_dir}`")
    if not path.is_file() and not path.is_symlink():
        raise KilnError(
            f"{kiln_dir} has no {MANIFEST}; it is not a kiln directory (run `diffkiln export` first) nor an "
            "optimum ONNX folder (model_index.json + unet/model.onnx)"
        )
    inside(kiln_dir, MANIFEST, MANIFEST)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise KilnError(f"{path} is {path.stat().st_size} bytes, too large for a manifest: do not use this kiln dir")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise KilnError(f"{path} is corrupt (not JSON); re-export with --force") from None
    validate(manifest, path)
    if check_files:
        check_paths(kiln_dir, manifest)
    return manifest


def sha256_of(path: Path) -> str:
    """A file's sha256, streamed (weights never sit in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_weight_map(kiln_dir: Path) -> dict:
    """weight_map.json: {component: {torch name: {"initializer": str, "transposed": bool}}}, validated."""
    path = Path(kiln_dir) / WEIGHT_MAP
    fix = "re-export the kiln dir with `diffkiln export --force`"
    try:
        inside(kiln_dir, WEIGHT_MAP, WEIGHT_MAP)
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise KilnError(f"{kiln_dir} has no readable {WEIGHT_MAP}; {fix}") from None
    ok = isinstance(data, dict) and all(
        c in COMPONENTS
        and isinstance(entries, dict)
        and all(
            isinstance(e, dict) and isinstance(e.get("initializer"), str) and isinstance(e.get("transposed"), bool)
            for e in entries.values()
        )
        for c, entries in data.items()
    )
    if not ok:
        raise KilnError(f"{path} is not a weight map ({{component: {{name: {{initializer, transposed}}}}}}); {fix}")
    return data


def validate(manifest, where: Path) -> None:
    """Types, required keys, known component names and sane numbers; raises naming the first bad field."""

    def bad(field: str, why: str):
        return KilnError(f"{where}: {field} {why}; the manifest is damaged or crafted (re-export it)")

    if not isinstance(manifest, dict):
        raise bad("the manifest", f"is a JSON {type(manifest).__name__}, not an object")
    for key, kind in (("pipeline", dict), ("components", dict), ("source", dict)):
        if not isinstance(manifest.get(key), kind):
            raise bad(key, "is missing or not an object")
    if not isinstance(manifest.get("format_version"), int) or isinstance(manifest["format_version"], bool):
        raise bad("format_version", "is missing or not an integer")
    pipeline = manifest["pipeline"]
    optional = {k: v for k, v in _OPTIONAL.items() if k in pipeline}
    for key, (kind, low, high) in {**_PIPELINE, **optional}.items():
        value = pipeline.get(key)
        number = kind in (int, float) and not isinstance(value, bool) and isinstance(value, int | float)
        if (kind is str and not isinstance(value, str)) or (kind in (int, float) and not number):
            raise bad(f"pipeline.{key}", f"is {value!r}, not a {kind.__name__}")
        if kind is int and not float(value).is_integer():
            raise bad(f"pipeline.{key}", f"is {value!r}, not an integer")
        if number and not (math.isfinite(value) and low <= value <= high):
            raise bad(f"pipeline.{key}", f"is {value!r}, outside {low}..{high}")
    if not isinstance(pipeline.get("guidance_embeds", False), bool):
        raise bad("pipeline.guidance_embeds", "is not true or false")
    if pipeline["kind"] not in PIPELINE_KINDS:
        raise bad("pipeline.kind", f"is {pipeline['kind']!r}, not one of {', '.join(PIPELINE_KINDS)}")
    if pipeline["prediction_type"] not in PREDICTION_TYPES:
        raise bad("pipeline.prediction_type", f"is {pipeline['prediction_type']!r}")
    hidden = pipeline.get("text_hidden")
    if not isinstance(hidden, list) or not 1 <= len(hidden) <= 2 or not all(_int_in(h, 1, 1 << 16) for h in hidden):
        raise bad("pipeline.text_hidden", f"is {hidden!r}, not a list of one or two sizes")
    layers = pipeline.get("text_layers", [])
    if not isinstance(layers, list) or len(layers) > len(hidden) or not all(_int_in(n, 0, 1024) for n in layers):
        raise bad("pipeline.text_layers", f"is {layers!r}, not a layer count per text encoder")
    if pipeline.get("contract", "diffkiln") not in CONTRACTS:
        raise bad("pipeline.contract", f"is {pipeline.get('contract')!r}, not one of {', '.join(CONTRACTS)}")
    interop = manifest.get("interop", {})
    configs = interop.get("configs") if isinstance(interop, dict) else None
    if not isinstance(interop, dict) or (interop and not isinstance(interop.get("model_index"), dict)):
        raise bad("interop", "is not a {model_index, configs} record")
    if interop and not (
        isinstance(configs, dict) and all(c in COMPONENTS and isinstance(v, dict) for c, v in configs.items())
    ):
        raise bad("interop.configs", "is not a {component: config} map")
    unknown = sorted(set(manifest["components"]) - set(COMPONENTS))
    if unknown:
        raise bad("components", f"names unknown component {unknown[0]!r} (known: {', '.join(COMPONENTS)})")
    for name, record in manifest["components"].items():
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise bad(f"components.{name}", "has no path")
        files = record.get("files")
        if not isinstance(files, dict) or not all(_file_record(f) for f in files.values()):
            raise bad(f"components.{name}.files", "is not a {name: {bytes, sha256}} map")
    folders = manifest.get("tokenizers", [])
    if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
        raise bad("tokenizers", "is not a list of folder names")
    if not isinstance(manifest.get("scheduler", ""), str):
        raise bad("scheduler", "is not a file name")


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _file_record(f) -> bool:
    return isinstance(f, dict) and _int_in(f.get("bytes"), 0, 1 << 50) and isinstance(f.get("sha256"), str)


def check_paths(kiln_dir: Path, manifest: dict) -> None:
    """Every path the manifest names stays inside `kiln_dir`, exists with its recorded size, and every ONNX
    external-data location stays inside its component's folder."""
    for folder in manifest.get("tokenizers", []):
        check_tree(kiln_dir, inside(kiln_dir, folder, f"manifest entry tokenizers {folder!r}"))
    if "scheduler" in manifest:
        inside(kiln_dir, manifest["scheduler"], "manifest entry scheduler")
    for name, record in manifest["components"].items():
        graph = inside(kiln_dir, record["path"], f"components.{name}.path")
        folder = kiln_dir / name
        if graph.parent.resolve() != folder.resolve():
            raise KilnError(f"components.{name}.path is {record['path']!r}, not a file in {name}/; do not use it")
        check_tree(kiln_dir, folder)
        for fname, meta in record["files"].items():
            f = inside(folder, fname, f"components.{name}.files {fname!r}")
            if f.is_file() and f.stat().st_size != meta["bytes"]:
                raise KilnError(
                    f"{f} is {f.stat().st_size} bytes but the manifest says {meta['bytes']}: the kiln dir is "
                    "truncated or was changed; re-export or re-download it"
                )
        if graph.is_file():
            for location in external_locations(graph):
                inside(folder, location, f"{name}/{graph.name}: external data location")


# --- ONNX external-data locations, read from the protobuf wire format ---------------------------------------
# onnx (the library) is not a runtime dependency, and both it and ONNX Runtime open `location`s while loading;
# so the few field numbers that can hold a TensorProto are walked by hand (onnx.proto3):
_MODEL = {7: "graph", 20: "training", 25: "function"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse"}
_NODE = {5: "attribute"}
_ATTRIBUTE = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_TRAINING = {1: "graph", 2: "graph"}
_FUNCTION = {7: "node"}
_TENSOR_EXTERNAL_DATA = 13
_MESSAGES = {
    "graph": _GRAPH,
    "node": _NODE,
    "attribute": _ATTRIBUTE,
    "sparse": _SPARSE,
    "training": _TRAINING,
    "function": _FUNCTION,
}


def external_locations(path: Path) -> list[str]:
    """Every external-data `location` named anywhere in an ONNX file; KilnError when it is not valid protobuf."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ValueError("empty file")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:  # indexed directly: no copies
                found: list[str] = []
                _walk(buf, 0, len(buf), _MODEL, found, depth=0)
                return found
    except (ValueError, IndexError, UnicodeDecodeError, RecursionError):
        raise KilnError(
            f"{path} is not a valid ONNX file (truncated or corrupt); re-export or re-download it"
        ) from None


# GraphProto.input = 11, .output = 12, .initializer = 5 (TensorProto.name = 8); ValueInfoProto: name = 1, type = 2;
# TypeProto.tensor_type = 1; Tensor: elem_type = 1 (varint), shape = 2; TensorShapeProto.dim = 1
_ELEM_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


def graph_io(path: Path) -> dict:
    """{"inputs"|"outputs": [(name, dtype, rank)], "opset": default-domain opset} of an ONNX file's main graph
    (initializers listed as inputs left out), read from the wire format like `external_locations`; KilnError
    when it is not valid protobuf."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            io: dict = {"inputs": [], "outputs": [], "opset": 0}
            inits: set[str] = set()
            for number, begin, stop in _fields(buf, 0, len(buf)):
                if number == 8:  # ModelProto.opset_import: OperatorSetIdProto {domain = 1, version = 2}
                    domain, version = _opset(buf, begin, stop)
                    io["opset"] = version if domain in ("", "ai.onnx") else io["opset"]
                if number != 7:  # ModelProto.graph
                    continue
                for field, b, e in _fields(buf, begin, stop):
                    if field in (11, 12):
                        io["inputs" if field == 11 else "outputs"].append(_value_info(buf, b, e))
                    elif field == 5:
                        inits.update(bytes(buf[nb:ne]).decode() for n, nb, ne in _fields(buf, b, e) if n == 8)
            io["inputs"] = [v for v in io["inputs"] if v[0] not in inits]
            return io
    except (ValueError, IndexError, UnicodeDecodeError, RecursionError, OSError):
        raise KilnError(
            f"{path} is not a valid ONNX file (truncated or corrupt); re-export or re-download it"
        ) from None


def _opset(buf, start: int, end: int) -> tuple[str, int]:
    domain, version, i = "", 0, start
    while i < end:
        key, i = _varint(buf, i, end)
        if key == (2 << 3):  # version, a varint
            version, i = _varint(buf, i, end)
        elif key & 7 == 2:
            n, i = _varint(buf, i, end)
            if key >> 3 == 1:
                domain = bytes(buf[i : i + n]).decode()
            i += n
        else:
            raise ValueError("unexpected field in an opset id")
    return domain, version


def _value_info(buf, start: int, end: int) -> tuple[str, str, int]:
    name, dtype, rank = "", "undefined", -1
    for number, begin, stop in _fields(buf, start, end):
        if number == 1:
            name = bytes(buf[begin:stop]).decode()
        elif number == 2:
            for n, b, e in _fields(buf, begin, stop):
                if n == 1:  # tensor_type: its elem_type is a varint, so walk it by hand
                    dtype, rank = _tensor_type(buf, b, e)
    return name, dtype, rank


def _tensor_type(buf, start: int, end: int) -> tuple[str, int]:
    dtype, rank, i = "undefined", -1, start
    while i < end:
        key, i = _varint(buf, i, end)
        if key == (1 << 3):  # elem_type, wire type 0
            value, i = _varint(buf, i, end)
            dtype = _ELEM_TYPES.get(value, f"type {value}")
        elif key & 7 == 2:
            n, i = _varint(buf, i, end)
            if key >> 3 == 2:  # shape: count its dims
                rank = sum(1 for f, _, _ in _fields(buf, i, i + n) if f == 1)
            i += n
        else:
            raise ValueError("unexpected field in a tensor type")
    return dtype, rank


def _walk(buf, start: int, end: int, fields: dict, found: list[str], depth: int) -> None:
    if depth > 64:
        raise ValueError("nested too deep")
    for number, begin, stop in _fields(buf, start, end):
        kind = fields.get(number)
        if kind == "tensor":
            _tensor(buf, begin, stop, found)
        elif kind is not None:
            _walk(buf, begin, stop, _MESSAGES[kind], found, depth + 1)


def _tensor(buf, start: int, end: int, found: list[str]) -> None:
    for number, begin, stop in _fields(buf, start, end):
        if number == _TENSOR_EXTERNAL_DATA:  # StringStringEntryProto: key = 1, value = 2
            entry = {n: bytes(buf[b:s]).decode() for n, b, s in _fields(buf, begin, stop)}
            if entry.get(1) == "location":
                found.append(entry.get(2, ""))


def _fields(buf, start: int, end: int):
    """(field number, begin, end) of each length-delimited field in buf[start:end]; other wire types skipped."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i, end)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise ValueError("field runs past its message")
            yield key >> 3, i, i + n
            i += n
        else:
            raise ValueError(f"wire type {wire}")
    if i != end:
        raise ValueError("message runs past its end")


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("bad varint")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7
