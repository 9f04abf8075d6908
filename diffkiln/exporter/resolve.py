"""`open_source`: what a SOURCE argument names — a preset, the bundled demo, a diffusers folder or a single-file
checkpoint — as a Source. Apart from sources.py so that single_file.py (which builds on sources.py's preset
source) and sources.py do not import each other."""

from __future__ import annotations

from pathlib import Path

from diffkiln.errors import SourceError
from diffkiln.exporter.presets import PRESETS
from diffkiln.exporter.single_file import SingleFileSource
from diffkiln.exporter.sources import BUNDLED, HUB_ID, PICKLES, FolderSource, PresetSource, Source


def open_source(ref: str, arch: str | None = None, text_encoders: tuple[Path, Path] | None = None) -> Source:
    """A preset name, a bundled model ("demo"), a local diffusers folder or a single-file checkpoint
    (`*.safetensors`, `arch` one of single_file.ARCHS or detected from its keys); anything else gets a one-line
    error saying what to pass."""
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return SingleFileSource(path, arch)
    if arch is not None:
        raise SourceError(f"--arch is for single-file checkpoints (*.safetensors); {ref} is not one, drop --arch")
    if ref in PRESETS:
        return PresetSource(PRESETS[ref])
    if ref in BUNDLED:
        return FolderSource(BUNDLED[ref])
    if path.is_dir():
        return FolderSource(path, text_encoders)
    if text_encoders:
        raise SourceError(f"--text-encoders needs a Flux diffusers folder as SOURCE; {ref} is not a folder")
    presets = ", ".join([*BUNDLED, *PRESETS])
    if path.suffix.lower() in PICKLES and path.exists():
        raise SourceError(
            f"{ref} is a pickle checkpoint, which can run code when loaded, so diffkiln never opens one; "
            "convert it to .safetensors with a tool you trust and pass that"
        )
    if path.exists():
        raise SourceError(
            f"{ref} is not a .safetensors checkpoint; SOURCE must be a diffusers model folder, a single-file "
            f"*.safetensors checkpoint or a preset ({presets})"
        )
    if HUB_ID.match(ref):
        raise SourceError(
            f"'{ref}' looks like a Hugging Face hub id, but diffkiln works offline on local folders: "
            f"download the model folder yourself and pass its path, or use a preset ({presets})"
        )
    raise SourceError(
        f"no such folder or file: {ref}; SOURCE must be a local diffusers folder, a *.safetensors checkpoint "
        f"or a preset ({presets})"
    )
