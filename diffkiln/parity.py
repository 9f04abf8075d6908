"""Numerical parity between two implementations of a component, checked at every stage boundary.

The error measure is the max absolute difference divided by the reference's largest magnitude
(`max|a - b| / max|b|`): an elementwise ratio explodes where the reference crosses zero, and a scale-free
measure lets one threshold serve every output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffkiln.errors import ParityError
from diffkiln.runtime.runners import OrtOptions, session_from_onnx

MAX_REL_ERR = {"fp32": 1e-4}


@dataclass(frozen=True)
class Diff:
    max_abs: float
    rel: float

    def to_json(self) -> dict:
        return {"max_abs_err": self.max_abs, "rel_err": self.rel}


def diff(got: np.ndarray, ref: np.ndarray) -> Diff:
    if got.shape != ref.shape:
        return Diff(float("inf"), float("inf"))
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    if not np.isfinite(got64).all():
        return Diff(float("inf"), float("inf"))
    max_abs = float(np.max(np.abs(got64 - ref64))) if got.size else 0.0
    scale = float(np.max(np.abs(ref64))) if ref.size else 0.0
    return Diff(max_abs, max_abs / max(scale, 1e-12))


def check(
    stage: str, component: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray], threshold: float
) -> dict[str, Diff]:
    """Compare every output; raise naming the stage, component and output when one is over the threshold."""
    result = {name: diff(got[name], ref[name]) for name in ref}
    for name, d in result.items():
        if not d.rel <= threshold:
            raise ParityError(
                f"{stage} parity failed for {component}.{name}: rel err {d.rel:.3g} > {threshold:g} "
                f"(max abs err {d.max_abs:.3g}, shape {ref[name].shape})"
            )
    return result


def ort_session(path: Path, providers: list[str] | None = None):
    """An ONNX Runtime CPU session with full graph optimizations, as users will run the graph.

    Built by `runtime.runners.session_from_onnx`; `providers` naming CUDA asks for the CUDA device instead.
    """
    device = "cuda" if providers and "CUDAExecutionProvider" in providers else "cpu"
    return session_from_onnx(path, OrtOptions(device=device, optimization="all"))
