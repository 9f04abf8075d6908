"""LoRA refit at run time: a refit payload (`diffkiln lora KILN --refit-payload FILE`) swapped into engines.

A payload holds absolute values, computed from the base kiln's weights, for just the initializers its LoRAs
change. Refitting A, then B, then A must leave exactly A's bytes (TensorRT issue 3628: peers refit deltas or
on top of the previous LoRA and mix them). The rule, per component, from what the engine holds now:
  - the payload sets every key it names (absolute values: what was there before does not matter);
  - a key an earlier payload changed that this one does not name goes back to the base: the refit then starts
    from the base graph's weights (`from_base`), which TensorRT's ONNX refitter reads from the kiln's model.onnx;
  - no payload (`None`) restores the base wherever anything was changed.
`RefitState` keeps that bookkeeping in plain Python; the runner only executes `refit(updates, from_base=...)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln.engines import REFIT_FORMAT, REFIT_META_KEY
from diffkiln.errors import DiffkilnError


@dataclass(frozen=True)
class Payload:
    record: dict  # {format, base: {path, manifest_sha256}, loras, base_sha256}
    tensors: dict[str, dict[str, np.ndarray]]  # component → {initializer: value}


def read_payload(path: Path) -> Payload:
    """A refit payload, read with safetensors (no build-stage code at run time); one-line errors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DiffkilnError(f"no such refit payload: {path}")
    try:
        with safe_open(str(path), "np") as f:
            record = json.loads((f.metadata() or {})[REFIT_META_KEY])
            if not isinstance(record, dict) or record.get("format") != REFIT_FORMAT:
                raise ValueError("format")
            tensors: dict[str, dict[str, np.ndarray]] = {}
            for key in f.keys():  # noqa: SIM118  (a safetensors handle is not iterable)
                component, _, initializer = key.partition("/")
                if not component or not initializer:
                    raise ValueError(key)
                tensors.setdefault(component, {})[initializer] = f.get_tensor(key)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        raise DiffkilnError(
            f"{path} is not a diffkiln refit payload; write one with `diffkiln lora KILN LORA --refit-payload FILE`"
        ) from None
    return Payload(record, tensors)


UNKNOWN = "\0unknown"  # not an initializer name: marks weights whose state a failed refit left unknown


@dataclass
class RefitState:
    """Which initializers of each component differ from the base now (what the engines hold)."""

    changed: dict[str, set[str]] = field(default_factory=dict)

    def steps(self, payload: Payload | None, components) -> dict[str, tuple[dict[str, np.ndarray], bool]]:
        """{component: (updates, from_base)} for every component whose weights must change to hold `payload`."""
        wanted = payload.tensors if payload else {}
        steps = {}
        for name in components:
            updates = wanted.get(name, {})
            stale = self.changed.get(name, set()) - set(updates)
            if updates or stale:
                steps[name] = (updates, bool(stale))
        return steps

    def applied(self, payload: Payload | None) -> None:
        self.changed = {name: set(values) for name, values in (payload.tensors if payload else {}).items()}


def check_base(payload: Payload, kiln_manifest_sha256: str, where: Path) -> None:
    """A payload is only applied to engines of the kiln dir it was computed from."""
    base = payload.record.get("base", {})
    if not isinstance(base, dict) or base.get("manifest_sha256") != kiln_manifest_sha256:
        raise DiffkilnError(
            f"{where} was computed from another kiln dir ({base.get('path', '?') if isinstance(base, dict) else '?'})"
            "; write the payload from the kiln these engines were built from"
        )


def apply(runners: dict, state: RefitState, payload: Payload | None, kiln_manifest_sha256: str, where: Path) -> int:
    """Refit the runners (component → TrtRunner) to hold `payload` (None: the base); returns components refitted."""
    if payload is not None:
        check_base(payload, kiln_manifest_sha256, where)
        unknown = sorted(set(payload.tensors) - set(runners))
        if unknown:
            raise DiffkilnError(f"{where} changes {unknown[0]}, which this pipeline does not run")
    steps = state.steps(payload, runners)
    for name in steps:
        if not hasattr(runners[name], "refit"):
            raise DiffkilnError(f"the {runners[name].name} backend cannot refit weights: use --backend tensorrt")
    try:
        for name, (updates, from_base) in steps.items():
            runners[name].refit(updates, from_base=from_base)
    except BaseException:
        state.changed = {name: {UNKNOWN} for name in runners}  # a half-done refit: the next one starts from base
        raise
    state.applied(payload)
    return len(steps)
