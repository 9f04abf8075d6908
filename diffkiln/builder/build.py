"""`diffkiln build`: one TensorRT engine per component of a kiln dir, written through the stage writer.

    build(kiln_dir, BuildRequest) → <engines>/<trt version>-sm<cc>/engine.json + <component>.plan

What is decided here is plain Python and tested on CPU: which components, their profiles (builder/profiles.py),
what the engine manifest records (diffkiln/engines.py), the stamp that makes a rebuild a no-op, and the one-line
refusals (no tensorrt, no GPU, a graph optimized for another target). The TensorRT call itself is
builder/trt.py, run in a fresh subprocess per component so one build's memory is returned before the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffkiln import engines, kiln
from diffkiln.builder.profiles import ShapeRequest, input_profiles
from diffkiln.builder.trt import BuildOptions
from diffkiln.errors import DiffkilnError, KilnError

TARGETS = ("tensorrt",)  # graphs optimized for these (or not optimized at all) are buildable


@dataclass(frozen=True)
class BuildRequest:
    shapes: ShapeRequest = field(default_factory=ShapeRequest)
    options: BuildOptions = field(default_factory=BuildOptions)
    components: tuple[str, ...] | None = None
    timing_cache: Path | None = None
    out: Path | None = None  # the engines root; default <kiln>/engines
    force: bool = False


def missing_requirements() -> str | None:
    """Why TensorRT engines cannot be built here, or None. Imports nothing."""
    return engines.trt_missing()


def parse_gpu(line: str) -> tuple[str, str]:
    """`nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader` line → (name, "8.9")."""
    name, _, cc = line.rpartition(",")
    if not name.strip() or not cc.strip().replace(".", "").isdigit():
        raise DiffkilnError(f"cannot read the GPU from nvidia-smi ({line.strip()!r}); is the driver working?")
    return name.strip(), cc.strip()


def this_device() -> engines.Device:
    import tensorrt as trt

    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    name, cc = parse_gpu(out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else "")
    return engines.Device(trt.__version__, name, cc)


def plan_build(kiln_dir: Path, manifest: dict, request: BuildRequest) -> dict[str, dict]:
    """{component: {"onnx", "profiles", "precision", "source_sha256"}} for every component to build."""
    target = manifest.get("optimized", {}).get("target")
    if target is not None and target not in TARGETS:
        raise KilnError(
            f"{kiln_dir} is optimized for {target}; TensorRT builds the tensorrt-target graphs: "
            f"diffkiln optimize KILN --target tensorrt [--precision fp16|int8] -o OUT, then build OUT"
        )
    names = list(manifest["components"])
    unknown = [c for c in request.components or () if c not in names]
    if unknown:
        raise DiffkilnError(f"{kiln_dir} has no component {unknown[0]!r} (it has {', '.join(names)})")
    plans = {}
    cfg = manifest["pipeline"].get("kind") != "flux"  # Flux's guidance is distilled: no [uncond; cond] batch
    for name in request.components or names:
        source_sha256, precision = engines.graph_facts(manifest, name)
        plans[name] = {
            "onnx": kiln.model_path(kiln_dir, name),
            "profiles": input_profiles(name, manifest["components"][name].get("contract", {}), request.shapes, cfg),
            "precision": precision,
            "source_sha256": source_sha256,
        }
    return plans


def build(kiln_dir: Path, request: BuildRequest, log=print) -> Path:
    """Build the engines; returns their folder. Refuses up front when TensorRT or a GPU is missing."""
    kiln_dir = Path(kiln_dir)
    manifest = kiln.read_manifest(kiln_dir)
    plans = plan_build(kiln_dir, manifest, request)  # bad requests fail before the GPU question
    if reason := missing_requirements():
        raise DiffkilnError(reason)
    device = this_device()
    out = (request.out or kiln_dir / "engines") / device.key
    out.parent.mkdir(parents=True, exist_ok=True)  # the engines root holds one folder per TensorRT × GPU
    stamp = {
        "device": asdict(device),
        "sources": {name: plan["source_sha256"] for name, plan in plans.items()},
        "shapes": asdict(request.shapes),
        "options": asdict(request.options),
    }
    with kiln.StageWriter(
        out,
        "build",
        stamp,
        force=request.force,
        same_kind=("sources",),
        reader=engines.read_engine_manifest,
        log=log,
        **engines.WRITER_OPTIONS,
    ) as w:
        if w.up_to_date:
            log(f"{out} is up to date")
            return out
        records = {}
        for i, (name, plan) in enumerate(plans.items(), 1):
            log(f"[{i}/{len(plans)}] building {name} ({plan['precision']}) …")
            size = _build_in_subprocess(plan, w.tmp / f"{name}{engines.PLAN_SUFFIX}", request)
            records[name] = engines.component_record(
                plan=f"{name}{engines.PLAN_SUFFIX}",
                size=size,
                source_sha256=plan["source_sha256"],
                precision=plan["precision"],
                profiles=plan["profiles"],
                refit=request.options.refit or request.options.strip_weights,
                stripped=request.options.strip_weights,
            )
        options = {**asdict(request.options), "shapes": asdict(request.shapes)}
        record = engines.engine_manifest(device, kiln.manifest_sha256(kiln_dir), manifest.get("lora"), records, options)
        w.finish(record)
    return out


def _build_in_subprocess(plan: dict, plan_path: Path, request: BuildRequest) -> int:
    """One engine in a fresh interpreter: TensorRT's build memory is given back when it exits."""
    job = {
        "onnx": str(plan["onnx"]),
        "plan": str(plan_path),
        "profiles": plan["profiles"],
        "options": asdict(request.options),
        "timing_cache": str(request.timing_cache) if request.timing_cache else None,
    }
    done = subprocess.run([sys.executable, "-m", "diffkiln.builder.worker"], input=json.dumps(job), text=True)
    if done.returncode != 0 or not plan_path.is_file():
        raise DiffkilnError(f"building {plan['onnx']} failed (TensorRT's log above); nothing was written")
    return plan_path.stat().st_size
