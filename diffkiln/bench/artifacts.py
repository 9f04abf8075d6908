"""What each path runs, made once before timing starts: the plain export, `diffkiln optimize` output, or the
peer optimizer's output; each with its one-off cost (seconds, bytes on disk). The work itself happens in the tools
worker; this module decides what to ask it for and records the answers."""

from __future__ import annotations

from pathlib import Path

from diffkiln import kiln
from diffkiln.bench.paths import PathDef
from diffkiln.bench.subject import Subject
from diffkiln.bench.workers import Worker, WorkerError

TXT2IMG = ("text_encoder", "text_encoder_2", "unet", "transformer", "vae_decoder")  # those a kiln has


def base_kiln(tools: Worker, subject: Subject) -> dict:
    """{kiln_dir, seconds, done_now} of the plain export: the given kiln directory (its export time as recorded
    in the manifest), or the source exported into the user cache (now, or found there from an earlier run)."""
    if subject.kiln_dir is not None:
        components = kiln.read_manifest(subject.kiln_dir)["components"].values()
        seconds = sum(c.get("export_seconds", 0.0) for c in components)
        return {"kiln_dir": str(subject.kiln_dir), "seconds": seconds, "done_now": False}
    return tools.call("export", ref=subject.ref)


def make(tools: Worker, path: PathDef, base: dict | None, source_ref: str | None) -> tuple[Path | None, dict]:
    """(kiln directory the path runs, its one-off costs). Torch paths run the source itself."""
    if path.artifact == "source":
        return None, {"artifact_bytes": source_bytes(source_ref)}
    one_off = {"export_seconds": base["seconds"], "exported_now": base["done_now"]}
    made = base
    if path.artifact in ("optimize", "engine"):
        # OpenVINO reads standard ONNX only, and TensorRT builds: the tensorrt target's graphs (no com.microsoft ops)
        target = "ort-cpu" if path.backend == "ort" else "tensorrt"
        made = tools.call("optimize", kiln_dir=base["kiln_dir"], target=target, precision=path.precision)
    if path.artifact == "engine":  # engines in <optimized kiln>/engines, built once (a no-op when up to date)
        built = tools.call("build", kiln_dir=made["kiln_dir"])
        one_off.update(build_seconds=built["seconds"])
    elif path.artifact == "ortx":
        made = tools.call("optimize_ortx", kiln_dir=base["kiln_dir"])
    if made is not base:
        one_off.update(optimize_seconds=made["seconds"], optimized_now=made["done_now"])
    kiln_dir = Path(made["kiln_dir"])
    return kiln_dir, {**one_off, "artifact_bytes": kiln_bytes(kiln_dir)}


def weights_mismatch(tools: Worker, source_ref: str, kiln_dir: str) -> str | None:
    """A warning when the reference would not run the weights that were exported (fidelity would be noise)."""
    recorded = kiln.read_manifest(Path(kiln_dir)).get("source", {}).get("fingerprint")
    try:
        if tools.call("source_matches", source_ref=source_ref, fingerprint=recorded):
            return None
        why = "its source fingerprint differs"
    except WorkerError as e:
        why = str(e)
    return f"the kiln directory may not hold the reference's weights ({why}): fidelity is suspect"


def kiln_bytes(kiln_dir: Path) -> int:
    """Bytes on disk of the components a txt2img run loads."""
    return kiln.components_bytes(kiln_dir, TXT2IMG)


def source_bytes(source_ref: str | None) -> int | None:
    """Weight files of a diffusers folder (a preset's weights are generated in memory: None)."""
    if not source_ref or not Path(source_ref).is_dir():
        return None
    folders = ("text_encoder", "text_encoder_2", "unet", "transformer", "vae")
    return sum(f.stat().st_size for d in folders for f in (Path(source_ref) / d).glob("*") if f.is_file())
