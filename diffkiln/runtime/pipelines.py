"""`open_pipeline`: the pipeline class a kiln dir's kind names — `Pipeline` (SD1/2/XL, UNet) or `FluxPipeline`
(runtime/flux.py) — above both, so neither imports the other's way back."""

from __future__ import annotations

from pathlib import Path

from diffkiln import kiln
from diffkiln.runtime.flux import FluxPipeline
from diffkiln.runtime.pipeline import Pipeline
from diffkiln.runtime.runners import OrtRunner


def open_pipeline(kiln_dir: Path, runner_factory=OrtRunner, **kw) -> Pipeline:
    """The pipeline of `kiln_dir`, its runners made by `runner_factory(path)` (see Pipeline)."""
    if kiln.read_manifest(Path(kiln_dir))["pipeline"]["kind"] == "flux":
        return FluxPipeline(kiln_dir, runner_factory, **kw)
    return Pipeline(kiln_dir, runner_factory, **kw)
