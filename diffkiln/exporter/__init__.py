"""torch → ONNX: model sources, component wrappers, export with parity, weight map. Imports torch lazily."""

from diffkiln.exporter.kiln_export import ExportOptions, export
from diffkiln.exporter.sources import open_source

__all__ = ["ExportOptions", "export", "open_source"]
