"""What is being benchmarked: the model's PyTorch source (for the reference) and its kiln directory (for diffkiln).

SOURCE may be a preset, a diffusers folder, a single-file checkpoint or a kiln directory. A kiln directory names its
source in its manifest (an optimized one also names the plain export it came from), so the reference can be rebuilt
from it; a preset, folder or single file is exported into the user cache (once) by the tools worker when a path needs
a kiln directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffkiln import kiln
from diffkiln.errors import DiffkilnError
from diffkiln.specs import VAE_SCALE, PipelineInfo


@dataclass
class Subject:
    ref: str  # as the user gave it
    info: PipelineInfo
    source_ref: str | None  # preset name, diffusers folder or single file the reference is built from
    source_problem: str | None  # why there is no source_ref
    kiln_dir: Path | None  # the plain (unoptimized) export, when it already exists

    @property
    def native_size(self) -> int:
        return self.info.sample_size * VAE_SCALE

    def to_json(self) -> dict:
        return {
            "ref": self.ref,
            "kind": self.info.kind,
            "denoiser": self.info.denoiser,  # the stage the report's "unet_*" figures time: unet | transformer
            "source": self.source_ref,
            "kiln_dir": str(self.kiln_dir) if self.kiln_dir else None,
        }


def resolve(ref: str) -> Subject:
    """A Subject for a preset, diffusers folder, single file or kiln directory; bad refs fail here with a one-line
    error."""
    path = Path(ref).expanduser()
    if kiln.is_kiln_dir(path):
        return _from_kiln(ref, path)
    from diffkiln.exporter.resolve import open_source  # no torch at import; a folder's headers are checked

    source = open_source(ref)
    return Subject(ref, source.info, source.ref, None, None)


def _from_kiln(ref: str, path: Path) -> Subject:
    manifest = kiln.read_manifest(path)
    origin = manifest.get("optimized", {}).get("from")
    if origin:  # an optimized directory: benchmark the plain export it was made from
        if not (Path(origin) / kiln.MANIFEST).is_file():
            raise DiffkilnError(f"{ref} was optimized from {origin}, which is gone; pass a plain kiln directory")
        path, manifest = Path(origin), kiln.read_manifest(Path(origin))
    source = manifest.get("source", {})
    source_ref, problem = _source_of(source)
    return Subject(ref, PipelineInfo.from_json(manifest["pipeline"]), source_ref, problem, path)


def _source_of(source: dict) -> tuple[str | None, str | None]:
    from diffkiln.exporter.presets import PRESETS

    kind, ref = source.get("kind"), source.get("ref")
    if kind == "preset" and ref in PRESETS:
        return ref, None
    if kind == "folder" and ref and Path(ref).is_dir():
        return ref, None
    if kind == "single-file" and ref and Path(ref).is_file():
        return ref, None
    return None, f"the kiln directory's source {ref!r} ({kind}) is not available here"
