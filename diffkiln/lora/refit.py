"""Refit payloads: the new values of just the initializers a LoRA changes, for engines that refit weights in place.

    payload.safetensors   {"<component>/<initializer>": new value}   (ONNX layout: already transposed where the
                                                                     graph holds Wᵀ, ready for a TensorRT refitter)
    __metadata__          {"diffkiln.refit": JSON {format, base, loras, base_sha256: {key: sha256 of base bytes}}}

Values are absolute, computed from the base kiln's weights, never deltas: applying A, then B, then A again
leaves exactly A's bytes, whatever the engine held before. `apply_payload` checks each base tensor's sha256 so a
payload is only ever applied on top of the weights it was computed from, and hands back base values for keys a
previous payload changed that this one does not (`restore`), so switching LoRAs never leaves stale weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from diffkiln.engines import REFIT_FORMAT as FORMAT
from diffkiln.engines import REFIT_META_KEY as META_KEY
from diffkiln.lora.errors import LoraError
from diffkiln.lora.initializers import ComponentGraph, tensor_sha256
from diffkiln.lora.tensorfile import TensorFile, TensorWriter


def payload_key(component: str, initializer: str) -> str:
    return f"{component}/{initializer}"


def split_key(key: str) -> tuple[str, str]:
    component, _, initializer = key.partition("/")
    return component, initializer


class PayloadWriter:
    """Streams a payload to `path`: declare every tensor first, then `write` each with its base tensor's hash."""

    def __init__(self, path: Path, specs: list[tuple[str, np.dtype, tuple[int, ...]]], record: dict):
        self.record = {**record, "format": FORMAT, "base_sha256": {key: "0" * 64 for key, _, _ in specs}}
        self.path = Path(path)
        self._writer = TensorWriter(path, specs, self._metadata())

    def _metadata(self) -> dict[str, str]:
        return {META_KEY: json.dumps(self.record, sort_keys=True)}

    def write(self, key: str, value: np.ndarray, base_sha256: str) -> None:
        self._writer.write(key, value)
        self.record["base_sha256"][key] = base_sha256

    def close(self) -> None:
        self._writer.close(self._metadata())

    def abort(self) -> None:
        self._writer.abort()


def read_payload(path: Path) -> tuple[TensorFile, dict]:
    file = TensorFile(path)
    try:
        record = json.loads(file.metadata[META_KEY])
        if record.get("format") != FORMAT:
            raise ValueError(record.get("format"))
    except (KeyError, ValueError):
        raise LoraError(
            f"{path} is not a diffkiln refit payload; write one with fold_loras(refit_payload=...)"
        ) from None
    return file, record


def apply_payload(
    base: Path | Mapping[str, np.ndarray], payload: Path, *, restore: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """The initializer values to refit: {key: value} for every payload tensor, plus the base value of each key in
    `restore` (keys an earlier payload changed) that this payload leaves alone.

    `base` is the base kiln dir (its graphs are read) or {key: base value}. Raises LoraError when a base tensor
    is not the one the payload was computed from (a payload is never applied on top of another LoRA)."""
    file, record = read_payload(Path(payload))
    keys = list(file.keys())
    wanted = keys + [k for k in restore if k not in keys]
    values = _read_kiln(Path(base), wanted) if isinstance(base, str | Path) else {k: base[k] for k in wanted}
    for key in keys:
        if tensor_sha256(values[key]) != record["base_sha256"][key]:
            raise LoraError(
                f"{key} is not the base weight {Path(payload).name} was computed from; refit from the base kiln's "
                f"weights ({record.get('base', {}).get('path', 'see the payload metadata')})"
            )
    updates = {k: values[k] for k in wanted if k not in keys}
    for key in keys:
        updates[key] = file.get(key).astype(values[key].dtype).reshape(values[key].shape)
    return updates


def _read_kiln(kiln_dir: Path, keys: list[str]) -> dict[str, np.ndarray]:
    by_component: dict[str, list[str]] = {}
    for key in keys:
        component, initializer = split_key(key)
        by_component.setdefault(component, []).append(initializer)
    values = {}
    for component, names in by_component.items():
        graph = ComponentGraph(kiln_dir / component)
        missing = [n for n in names if n not in graph.tensors]
        if missing:
            raise LoraError(f"{kiln_dir} has no initializer {component}/{missing[0]}; is it the payload's base kiln?")
        values |= {payload_key(component, n): graph.read(n) for n in names}
    return values
