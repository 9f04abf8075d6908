"""torch → ONNX: model sources, component wrappers, export with parity, weight map. Imports torch lazily, and
onnx only when an export runs (`diffkiln run` resolves a cached source's fingerprint through `sources` alone)."""

import importlib

_WHERE = {"ExportOptions": "kiln_export", "export": "kiln_export", "open_source": "resolve"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'diffkiln.exporter' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffkiln.exporter.{_WHERE[name]}"), name)
