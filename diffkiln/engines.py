"""The engine manifest: what a TensorRT engine was built from and for, and the rules that refuse a stale one.

    <engines>/<trt version>-sm<cc>/engine.json + <component>.plan

An engine only runs on the TensorRT version and GPU architecture it was built with, and only means what its
source graph meant. Peers key engines by file path or name and reuse wrong ones silently; diffkiln records
everything an engine depends on and `mismatch` names the first thing that differs, with the command that
rebuilds. Pure Python: the builder writes these records and the runtime (TrtRunner) checks them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from diffkiln.errors import KilnError
from diffkiln.kiln_reader import inside

ENGINE_MANIFEST = "engine.json"
FORMAT = "diffkiln-engines/1"
PLAN_SUFFIX = ".plan"
# a LoRA refit payload's metadata record (written by diffkiln.lora.refit, read by diffkiln.runtime.refit)
REFIT_META_KEY = "diffkiln.refit"
REFIT_FORMAT = "diffkiln-refit/1"
_KEY = re.compile(r"^[0-9][0-9.]*-sm[0-9]{2,3}$")


@dataclass(frozen=True)
class Device:
    """What an engine is tied to: the TensorRT version that built it and the GPU it was built on."""

    trt_version: str
    gpu_name: str
    compute_capability: str  # "8.9"

    @property
    def key(self) -> str:
        """The engine folder's name: `10.13.0.35-sm89`."""
        return engine_key(self.trt_version, self.compute_capability)


def engine_key(trt_version: str, compute_capability: str) -> str:
    major, _, minor = compute_capability.partition(".")
    return f"{trt_version}-sm{major}{minor or '0'}"


def rebuild_command(kiln_dir: Path | str) -> str:
    return f"diffkiln build {kiln_dir}"


def read_engine_manifest(folder: Path) -> dict:
    """engine.json of an engine folder, validated; every plan it names is confined to the folder."""
    folder = Path(folder)
    path = folder / ENGINE_MANIFEST
    if not path.is_file():
        raise KilnError(f"{folder} has no {ENGINE_MANIFEST}; build engines with `diffkiln build KILN`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KilnError(f"{path} is not readable JSON ({type(e).__name__}); rebuild with `diffkiln build`") from None
    _validate(manifest, path)
    for name, record in manifest["components"].items():
        plan = inside(folder, record["plan"], f"{ENGINE_MANIFEST} plan of {name!r}")
        if not plan.is_file():
            raise KilnError(f"{path}: {record['plan']} is missing; rebuild with `diffkiln build`")
        if plan.stat().st_size != record["bytes"]:
            raise KilnError(f"{plan} is not the engine {ENGINE_MANIFEST} records (size differs); rebuild it")
    return manifest


def _validate(manifest, where: Path) -> None:
    def bad(why: str):
        raise KilnError(f"{where}: {why}; rebuild with `diffkiln build`")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        bad(f"not a diffkiln engine manifest (format {FORMAT!r} expected)")
    device = manifest.get("device")
    if not isinstance(device, dict) or not all(
        isinstance(device.get(k), str) for k in ("trt_version", "gpu_name", "compute_capability")
    ):
        bad("device must record trt_version, gpu_name and compute_capability")
    components = manifest.get("components")
    if not isinstance(components, dict) or not components:
        bad("components must name at least one engine")
    for name, record in components.items():
        if not isinstance(record, dict):
            bad(f"component {name!r} is not a record")
        if not isinstance(record.get("plan"), str) or not isinstance(record.get("bytes"), int):
            bad(f"component {name!r} needs plan (a file name) and bytes")
        if not isinstance(record.get("source_sha256"), str) or not isinstance(record.get("profiles"), dict):
            bad(f"component {name!r} needs source_sha256 and profiles")


def component_record(
    *, plan: str, size: int, source_sha256: str, precision: str, profiles: dict, refit: bool, stripped: bool
) -> dict:
    return {
        "plan": plan,
        "bytes": size,
        "source_sha256": source_sha256,
        "precision": precision,
        "profiles": {k: [list(s) for s in v] for k, v in profiles.items()},
        "refittable": refit,
        "stripped": stripped,
    }


def engine_manifest(device: Device, kiln_manifest_sha256: str, lora, components: dict, options: dict) -> dict:
    return {
        "format": FORMAT,
        "device": {
            "trt_version": device.trt_version,
            "gpu_name": device.gpu_name,
            "compute_capability": device.compute_capability,
        },
        "kiln_manifest_sha256": kiln_manifest_sha256,
        "lora": lora,
        "options": options,
        "components": components,
    }


def graph_facts(kiln_manifest: dict, component: str) -> tuple[str, str]:
    """(sha256 of the component's model.onnx, its precision) as the kiln manifest records them: what an engine
    is built from (build.py) and checked against (mismatch), read in one place."""
    record = kiln_manifest.get("components", {}).get(component, {})
    sha = record.get("files", {}).get("model.onnx", {}).get("sha256", "")
    return sha, record.get("precision", kiln_manifest.get("precision", "fp32"))


# the StageWriter settings of an engine folder: its manifest is engine.json, read by read_engine_manifest
WRITER_OPTIONS = {"nested_ok": True, "manifest_name": ENGINE_MANIFEST, "interop_files": False}


def mismatch(engine: dict, component: str, *, device: Device, kiln_manifest: dict) -> str | None:
    """Why the engine of `component` must not run here with this kiln dir, or None. Checks, in order: the
    TensorRT version, the GPU architecture, that an engine exists, the source graph's sha256 (recorded in the
    kiln manifest's file records), the precision and the LoRA state."""
    built = engine["device"]
    if built["trt_version"] != device.trt_version:
        return f"built with TensorRT {built['trt_version']}, this is TensorRT {device.trt_version}"
    if built["compute_capability"] != device.compute_capability:
        return (
            f"built for {built['gpu_name']} (sm{built['compute_capability']}), "
            f"this GPU is {device.gpu_name} (sm{device.compute_capability})"
        )
    return source_mismatch(engine, component, kiln_manifest=kiln_manifest)


def source_mismatch(engine: dict, component: str, *, kiln_manifest: dict) -> str | None:
    """The checks of `mismatch` that need no GPU (what the engine was built from, not for): that an engine of
    `component` exists, its source graph's sha256, its precision and the LoRA state; None when all hold."""
    record = engine["components"].get(component)
    if record is None:
        return f"has no {component} engine"
    source, precision = graph_facts(kiln_manifest, component)
    if source != record["source_sha256"]:
        return f"{component} was built from another graph (the kiln's {component}/model.onnx changed since)"
    if record.get("precision", "fp32") != precision:
        return f"{component} engine is {record.get('precision')}, the kiln's graph is {precision}"
    if engine.get("lora") != kiln_manifest.get("lora"):
        return "built with other LoRAs folded in than the kiln dir now holds"
    return None


def check_engine(engine: dict, component: str, *, device: Device, kiln_manifest: dict, kiln_dir: Path) -> None:
    """Raise KilnError (one line: what differs, the command that rebuilds) when the engine is stale."""
    if reason := mismatch(engine, component, device=device, kiln_manifest=kiln_manifest):
        raise KilnError(f"stale engine: {reason}; rebuild with `{rebuild_command(kiln_dir)} --force`")


def check_shapes(component: str, profile: dict, feeds_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise KilnError naming the profile's range when a feed's shape lies outside the engine's profile."""
    for name, shape in feeds_shapes.items():
        if name not in profile:
            continue
        low, _, high = (tuple(s) for s in profile[name])
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
            raise KilnError(
                f"{component} input {name} has shape {list(shape)}, outside the engine's profile "
                f"{list(low)}..{list(high)}; rebuild with wider --batch/--height/--width"
            )


INSTALL = "pip install 'diffkiln[tensorrt]' on a machine with an NVIDIA GPU and driver"


def trt_missing(*, run: bool = False) -> str | None:
    """Why TensorRT engines cannot be built (or, `run`, run) here, or None. Imports nothing."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed: {INSTALL}"
    if run and importlib.util.find_spec("cuda") is None:
        return f"running engines needs cuda-python, which is not installed: {INSTALL}"
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU found (nvidia-smi is missing): TensorRT engines need one"
    return None


def is_engine_key(name: str) -> bool:
    """Whether a folder name is an engine folder's (`10.13.0.35-sm89`)."""
    return bool(_KEY.match(name))


def engine_dirs(engines_root: Path) -> list[Path]:
    """The engine folders under an engines root (or the root itself when it is one); symbolic links skipped."""
    root = Path(engines_root)
    if (root / ENGINE_MANIFEST).is_file():
        return [root]
    if not root.is_dir() or root.is_symlink():
        return []
    return sorted(p for p in root.iterdir() if is_engine_key(p.name) and p.is_dir() and not p.is_symlink())


def find_engine_dir(engines_root: Path, device: Device) -> Path:
    """The engine folder for this device under `engines_root`, or a one-line error listing what is there. A
    folder given as the engines root itself (`--engines root/10.13.0.35-sm89`) is taken when its key matches."""
    engines_root = Path(engines_root)
    for path in (engines_root, engines_root / device.key):
        if path.is_symlink():
            raise KilnError(f"{path} is a symbolic link; pass the real engines folder with --engines")
    if engines_root.exists() and not engines_root.is_dir():
        raise KilnError(f"{engines_root} is not a folder of engines; pass the engines root with --engines")
    if _KEY.match(engines_root.name) and (engines_root / ENGINE_MANIFEST).is_file():
        if engines_root.name != device.key:
            raise KilnError(f"{engines_root} holds engines for {engines_root.name}, this machine is {device.key}; "
                            "rebuild with `diffkiln build`")  # fmt: skip
        return engines_root
    folder = engines_root / device.key
    if (folder / ENGINE_MANIFEST).is_file():
        return folder
    others = sorted(p.name for p in Path(engines_root).glob("*") if _KEY.match(p.name))
    there = f" (it holds engines for {', '.join(others)})" if others else ""
    raise KilnError(f"{engines_root} has no engines for {device.key}{there}; build them with `diffkiln build`")
