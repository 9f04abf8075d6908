"""`diffkiln optimize`: rewrite every component of a kiln directory for a target, prove parity, write a report.

The output is a complete kiln directory (manifest, tokenizers, scheduler, weight map, graphs) at
`KILN/optimized/<target>-<precision>/` unless told otherwise, so `diffkiln run -m` takes it as is. Each graph
is checked against the unoptimized one in ONNX Runtime at the export's two parity shapes (fp32: rel err ≤ 1e-4);
a failure names the component, output and stage, and nothing is written.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from diffkiln import __version__, kiln
from diffkiln.errors import library_errors
from diffkiln.onnxio import has_external_data, load_graph
from diffkiln.optimizers.manager import run_passes
from diffkiln.optimizers.presets import preset
from diffkiln.parity import MAX_REL_ERR, check, ort_session
from diffkiln.specs import PipelineInfo, component_specs, parity_dims
from diffkiln.weight_map import follow

REPORT = "optimize_report.json"
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
) -> dict:
    """Optimize every component of `kiln_dir`; returns the report. `attention` overrides the target's choice
    of attention form (benchmarks only)."""
    kiln_dir = Path(kiln_dir)
    manifest = kiln.read_manifest(kiln_dir)
    passes = preset(target, precision, attention)  # validates target and precision before any work
    default = out is None or Path(out) == default_out(kiln_dir, target, precision)
    out = Path(out) if out else default_out(kiln_dir, target, precision)
    stamp = {
        "source_manifest": kiln.file_sha256(kiln_dir / kiln.MANIFEST),
        "target": target,
        "precision": precision,
        "attention": attention or "default",
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
            report = _optimize_into(kiln_dir, manifest, w, passes, stamp, log)
    except BaseException:
        if made_parent:
            with contextlib.suppress(OSError):
                out.parent.rmdir()  # only if still empty: never leave an empty KILN/optimized/ behind
        raise
    return report


def _optimize_into(kiln_dir: Path, manifest: dict, w: kiln.StageWriter, passes, stamp: dict, log) -> dict:
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
    for name in manifest["components"]:
        src = kiln.model_path(kiln_dir, name)
        dst = kiln.model_path(w.tmp, name)
        record = optimize_component(src, dst, specs[name], info, passes, log)
        weight_map[name], lost = follow(weight_map.get(name, {}), src, dst)
        record["weights_lost"] = lost
        report["components"][name] = record
        new_manifest["components"][name].update(
            files=kiln.file_records(dst.parent),
            external_data=(dst.parent / "model.onnx.data").exists(),
            optimize=record,
        )
    w.copy_support(kiln_dir, manifest)
    kiln.write_json(w.tmp / kiln.WEIGHT_MAP, weight_map)
    w.finish(new_manifest, reports={REPORT: report})
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
