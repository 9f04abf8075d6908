"""`diffkiln optimize`: rewrite every component of a kiln directory for a target, prove parity, write a report.

The output is a complete kiln directory (manifest, tokenizers, scheduler, weight map, graphs) at
`KILN/optimized/<target>-<precision>/` unless told otherwise, so `diffkiln run -m` takes it as is. Each graph
is checked against the unoptimized one in ONNX Runtime at the export's two parity shapes (fp32: rel err ≤ 1e-4);
a failure names the component, output and stage, and nothing is written. With `precision` fp16 or int8 the
chosen components are then converted (optimizers/precision/) on calibration inputs recorded from the pipeline
(`calibration(components) -> {component: [feeds]}`, see diffkiln/calibration.py), scored against fp32 on
held-back inputs, and described in precision_report.json (islands, kept layers, ranges: the recipe).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from diffkiln import __version__, kiln
from diffkiln.errors import DiffkilnError, library_errors
from diffkiln.onnxio import has_external_data, load_graph
from diffkiln.optimizers.manager import run_passes
from diffkiln.optimizers.precision.apply import PrecisionOptions, apply
from diffkiln.optimizers.presets import PRECISION_COMPONENTS, preset
from diffkiln.parity import MAX_REL_ERR, check, ort_session
from diffkiln.specs import PipelineInfo, component_specs, parity_dims
from diffkiln.weight_map import follow

REPORT = "optimize_report.json"
PRECISION_REPORT = "precision_report.json"
EXTERNAL_THRESHOLD = 1 << 31  # bytes of initializers above which weights go to model.onnx.data


def default_out(kiln_dir: Path, target: str, precision: str) -> Path:
    return Path(kiln_dir) / "optimized" / f"{target}-{precision}"


def optimize(
    kiln_dir: Path,
    target: str,
    precision: str = "fp32",
    out: Path | None = None,
    force: bool = False,
    log: Callable = print,
    attention: str | None = None,
    *,
    components: list[str] | None = None,
    calibration: Callable[[list[str]], dict[str, list[dict]]] | None = None,
    calibration_key: dict | None = None,
    options: PrecisionOptions | None = None,
    recipe: dict | None = None,
) -> dict:
    """Optimize every component of `kiln_dir`; returns the report. `attention` overrides the target's choice
    of attention form (benchmarks only). fp16/int8 convert `components` (default: PRECISION_COMPONENTS) on what
    `calibration` records; `calibration_key` (prompts, steps …) goes into the stamp; `recipe` replays an earlier
    precision_report.json's choices."""
    kiln_dir = Path(kiln_dir)
    manifest = kiln.read_manifest(kiln_dir)
    passes = preset(target, precision, attention)  # validates target and precision before any work
    options = options or PrecisionOptions()
    chosen = _precision_components(precision, components, manifest)
    if chosen and calibration is None:
        raise DiffkilnError(f"--precision {precision} needs calibration inputs recorded from the pipeline")
    default = out is None or Path(out) == default_out(kiln_dir, target, precision)
    out = Path(out) if out else default_out(kiln_dir, target, precision)
    stamp = {
        "source_manifest": kiln.file_sha256(kiln_dir / kiln.MANIFEST),
        "target": target,
        "precision": precision,
        "attention": attention or "default",
    }
    if chosen:
        stamp |= {
            "components": chosen,
            "calibration": calibration_key or {},
            "options": options.to_json(),
            "recipe": hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest() if recipe else None,
        }
    made_parent = default and not out.parent.exists()
    if made_parent:
        out.parent.mkdir(parents=True)
    try:
        writer = kiln.StageWriter(
            out,
            "optimize",
            stamp,
            force=force,
            sources=[kiln_dir],
            nested_ok=True,
            same_kind=("target", "precision", "attention"),
            log=log,
        )
        with writer as w:
            if w.up_to_date:
                log(f"{out} is up to date (use --force to re-optimize)")
                return _read_report(out) or {}
            w.check_space(kiln.components_bytes(kiln_dir, manifest["components"]))
            precision_plan = (chosen, calibration, options, recipe) if chosen else None
            report = _optimize_into(kiln_dir, manifest, w, passes, stamp, log, precision_plan)
    except BaseException:
        if made_parent:
            with contextlib.suppress(OSError):
                out.parent.rmdir()  # only if still empty: never leave an empty KILN/optimized/ behind
        raise
    return report


def _precision_components(precision: str, components: list[str] | None, manifest: dict) -> list[str]:
    if precision == "fp32":
        if components:
            raise DiffkilnError("--components chooses what --precision fp16/int8 converts; fp32 converts nothing")
        return []
    present = list(manifest["components"])
    wanted = components or [c for c in PRECISION_COMPONENTS[precision] if c in present]
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise DiffkilnError(f"--components {unknown[0]} is not in this kiln dir (it has {', '.join(present)})")
    return list(dict.fromkeys(wanted))


def _optimize_into(
    kiln_dir: Path, manifest: dict, w: kiln.StageWriter, passes, stamp: dict, log, precision_plan=None
) -> dict:
    info = PipelineInfo.from_json(manifest["pipeline"])
    specs = component_specs(info)
    weight_map = kiln.read_weight_map(kiln_dir)
    report = {**stamp, "created_by": f"diffkiln {__version__}", "components": {}}
    new_manifest = json.loads(json.dumps(manifest))
    new_manifest["optimized"] = {
        "target": stamp["target"],
        "precision": stamp["precision"],
        "from": str(kiln_dir.resolve()),
    }
    chosen, calibration, options, recipe = precision_plan or ([], None, None, None)
    feeds = {}
    if chosen:
        log(f"recording calibration inputs for {', '.join(chosen)} from the fp32 pipeline")
        feeds = calibration(chosen)
    precision_report = {"precision": stamp["precision"], "target": stamp["target"], "components": {}}
    new_manifest["precision"] = stamp["precision"] if chosen else manifest.get("precision", "fp32")
    for name in manifest["components"]:
        src = kiln.model_path(kiln_dir, name)
        dst = kiln.model_path(w.tmp, name)
        record = optimize_component(src, dst, specs[name], info, passes, log)
        weight_map[name], lost = follow(weight_map.get(name, {}), src, dst)
        record["weights_lost"] = lost
        component_precision = "fp32"
        if name in chosen:
            component_recipe = (recipe or {}).get("components", {}).get(name)
            precision_report["components"][name] = apply(
                name, dst.parent, stamp["precision"], stamp["target"], feeds[name], options, component_recipe, log
            )
            component_precision = stamp["precision"]
            if options.fp16_io and component_precision == "fp16":  # the runtime casts feeds to what this records
                for tensor in [*new_manifest["components"][name]["contract"].get("inputs", []),
                               *new_manifest["components"][name]["contract"].get("outputs", [])]:  # fmt: skip
                    if tensor.get("dtype") == "float32":
                        tensor["dtype"] = "float16"
            weight_map.pop(name, None)  # converted weights no longer match the source's by value: no refit map
        report["components"][name] = record
        new_manifest["components"][name].update(
            files=kiln.file_records(dst.parent),
            external_data=(dst.parent / "model.onnx.data").exists(),
            optimize=record,
            precision=component_precision,
        )
    w.copy_support(kiln_dir, manifest)
    kiln.write_json(w.tmp / kiln.WEIGHT_MAP, weight_map)
    reports = {REPORT: report}
    if chosen:
        precision_report["options"] = options.to_json()
        reports[PRECISION_REPORT] = precision_report
    w.finish(new_manifest, reports=reports)
    return report


def optimize_component(src: Path, dst: Path, spec, info: PipelineInfo, passes, log: Callable) -> dict:
    start = time.perf_counter()
    with library_errors(f"cannot read {src}", "re-export the kiln dir"):
        model = ir.load(str(src))  # external weights stay memory-mapped on disk
    records = run_passes(model, passes)
    dst.parent.mkdir(parents=True)
    _save(model, dst, external=has_external_data(load_graph(src)))
    del model
    gc.collect()

    # one session at a time: two copies of a 10 GB SDXL UNet would not fit beside each other
    shapes = parity_dims(info)
    feeds = [spec.sample_inputs(d, info, seed=seed) for seed, d in enumerate(shapes)]
    refs = _run_all(src, spec.output_names, feeds)
    gots = _run_all(dst, spec.output_names, feeds)
    cases = []
    for d, ref, got in zip(shapes, refs, gots, strict=True):
        diffs = check("optimize", spec.name, got, ref, MAX_REL_ERR["fp32"])
        cases.append({"dims": d, "outputs": {k: v.to_json() for k, v in diffs.items()}})
    worst = max(o["rel_err"] for c in cases for o in c["outputs"].values())
    seconds = time.perf_counter() - start
    counts = {r.name: r.count for r in records}
    nodes = f"{records[0].nodes_before} → {records[-1].nodes_after} nodes"
    log(f"{spec.name}: {nodes}, {counts}, parity rel err {worst:.2e}, {seconds:.1f} s")
    return {
        "passes": [r.to_json() for r in records],
        "counts": counts,
        "nodes_before": records[0].nodes_before,
        "nodes_after": records[-1].nodes_after,
        "parity": {"max_rel_err": MAX_REL_ERR["fp32"], "worst_rel_err": worst, "cases": cases},
        "seconds": round(seconds, 2),
    }


def _run_all(path: Path, names: list[str], feeds: list[dict]) -> list[dict]:
    with library_errors(f"ONNX Runtime cannot run {path}", "re-export the kiln dir"):
        session = ort_session(path)
        outputs = [dict(zip(names, session.run(names, f), strict=True)) for f in feeds]
    session = None
    gc.collect()
    return outputs


def _save(model: ir.Model, path: Path, external: bool) -> None:
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if external or size > EXTERNAL_THRESHOLD:
        ir.save(model, str(path), external_data=path.name + ".data")
    else:
        ir.save(model, str(path))


def _read_report(out: Path) -> dict | None:
    try:
        return json.loads((out / REPORT).read_text())
    except (OSError, json.JSONDecodeError):
        return None
