"""The bench's "components" kind: one component call (UNet or Flux transformer step, VAE decode) per path instead
of whole generations — where the end-to-end differences come from.

`run_bench(..., kind="components")` runs it with the same skeleton (one worker per path, one-off work first, calls
interleaved A B C A B C …); this module holds only what differs: the calls (the spec's seeded sample inputs at the
bench shape: the UNet on 2·batch rows when guidance is on, one CFG step; Flux's transformer on batch rows, its
guidance being distilled; the VAE decoder on batch latents), their summary and their tables.
"""

from __future__ import annotations

import numpy as np

from diffkiln.bench.config import BenchConfig
from diffkiln.bench.measure import stats
from diffkiln.bench.paths import REFERENCE
from diffkiln.bench.report import denoiser_label
from diffkiln.bench.summary import peak_for
from diffkiln.specs import VAE_SCALE, PipelineInfo, component_specs, dims

FORMAT = "diffkiln-bench-components/1"


def components(info: PipelineInfo) -> tuple[str, ...]:
    """The components timed, in call order: the denoiser (unet, or Flux's transformer) and the VAE decoder."""
    return (info.denoiser, "vae_decoder")


def component_feeds(info: PipelineInfo, component: str, config: BenchConfig) -> dict:
    """Seeded sample inputs for one call of `component` at the config's size and batch (Flux: the T5 sequence the
    kiln was exported for)."""
    rows = 2 * config.batch if config.cfg and component == info.denoiser else config.batch
    shape = dims(rows, config.height // VAE_SCALE, config.width // VAE_SCALE, text_sequence=info.text_sequence)
    feeds = component_specs(info)[component].sample_inputs(shape, info, seed=0)
    if "guidance" in feeds:  # Flux's distilled guidance: the bench's scale, not a random draw
        feeds["guidance"] = np.full_like(feeds["guidance"], config.guidance)
    return feeds


def calls(subject, config: BenchConfig) -> list[tuple[str, dict]]:
    """One `time_component` call per component; warm-up rounds send the same calls."""
    info = subject.info
    return [("time_component", {"component": c, "feeds": component_feeds(info, c, config)}) for c in components(info)]


def record(run, component: str, seconds: float) -> None:
    run.samples.append({"component": component, "seconds": seconds})


def summarize(session) -> dict:
    """The report's kind-specific part: per component, each path's latency, throughput and speedup."""
    return {"components": {c: _component_summary(c, session) for c in components(session.subject.info)}}


def _component_summary(component: str, session) -> dict:
    per_call = session.flops.get("per_call", {}).get(component)
    rows = {}
    for run in session.runs:
        times = [s["seconds"] for s in run.samples if s["component"] == component]
        if run.status != "ok" or not times:
            continue
        entry = {"latency": stats(times), "memory_peak": run.memory.get("peak")}
        if per_call:
            entry["flops_per_s"] = per_call / entry["latency"]["median"]
            peak = peak_for(run.definition.precision, session.machine)
            if peak and run.load.get("device", "cpu") == "cpu":
                entry["fraction_of_peak"] = entry["flops_per_s"] / peak
        rows[run.name] = entry
    reference = rows.get(REFERENCE)
    for entry in rows.values():
        if reference:
            entry["speedup"] = reference["latency"]["median"] / entry["latency"]["median"]
    return {"gflop_per_call": per_call / 1e9 if per_call else None, "paths": rows}


def markdown(result: dict) -> list[str]:
    c = result["config"]
    cfg = f" ({denoiser_label(result)} on 2·batch rows: CFG)" if c["cfg"] else ""
    lines = [
        f"# diffkiln bench, one call per component: {result['subject']['ref']}, {c['height']}×{c['width']}, "
        f"batch {c['batch']}{cfg}, median of {c['runs']} calls",
        "",
        f"CPU: {result['environment']['cpu']['model']}; load average start / end: "
        f"{result['environment']['load_average_start']} / {result['environment']['load_average_end']}",
        "",
        f"| component | path | median ms (min–max) | GFLOP/s | of GEMM peak | speedup vs {REFERENCE} |",
        "|---|---|---|---|---|---|",
    ]
    for component, summary in result["components"].items():
        for name, e in summary["paths"].items():
            lat = e["latency"]
            span = f"{lat['median'] * 1e3:.1f} ({lat['min'] * 1e3:.1f}–{lat['max'] * 1e3:.1f})"
            gflops = f"{e['flops_per_s'] / 1e9:.1f}" if e.get("flops_per_s") else "—"
            share = f"{e['fraction_of_peak']:.1%}" if e.get("fraction_of_peak") is not None else "—"
            speed = f"{e['speedup']:.2f}×" if e.get("speedup") else "—"
            lines.append(f"| {component} | `{name}` | {span} | {gflops} | {share} | {speed} |")
    failed = {n: p for n, p in result["paths"].items() if p["status"] != "ok"}
    lines += ["", *[f"- `{name}`: {p['status']}: {p['reason']}" for name, p in failed.items()]]
    return lines + [f"- **warning**: {w}" for w in result["warnings"]]


def console_summary(result: dict) -> list[str]:
    lines = [f"{'component':12s} {'path':14s} {'median ms':>10s} {'speedup':>8s}"]
    for component, summary in result["components"].items():
        for name, e in summary["paths"].items():
            speed = f"{e['speedup']:.2f}×" if e.get("speedup") else "—"
            lines.append(f"{component:12s} {name:14s} {e['latency']['median'] * 1e3:10.1f} {speed:>8s}")
    return lines
