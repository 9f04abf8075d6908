"""Micro-benchmarks: one component call (UNet step, VAE decode) per path, on identical seeded feeds.

Same machinery as `run_bench` (one worker per path, one-off work first, calls interleaved A B C A B C …), but each
call is a single component on the spec's sample inputs at the bench shape: the UNet on 2·batch rows when guidance
is on (one CFG step), the VAE decoder on batch latents. Writes micro.json and micro.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from diffkiln.bench import env, report
from diffkiln.bench.config import BenchConfig
from diffkiln.bench.measure import stats
from diffkiln.bench.paths import DEFAULT_PATHS, REFERENCE, parse_paths
from diffkiln.bench.session import BenchSession
from diffkiln.bench.subject import resolve
from diffkiln.bench.summary import peak_for
from diffkiln.specs import VAE_SCALE, component_specs, dims

COMPONENTS = ("unet", "vae_decoder")


def component_feeds(info, component: str, config: BenchConfig) -> dict:
    """Seeded sample inputs for one call of `component` at the config's size and batch."""
    rows = 2 * config.batch if config.cfg and component == "unet" else config.batch
    shape = dims(rows, config.height // VAE_SCALE, config.width // VAE_SCALE)
    return component_specs(info)[component].sample_inputs(shape, info, seed=0)


def run_micro(
    source_or_kiln: str,
    paths: Sequence[str] | str = DEFAULT_PATHS,
    *,
    components: Sequence[str] = COMPONENTS,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    guidance: float = 7.5,
    runs: int = 5,
    warmup: int = 1,
    one_at_a_time: bool = False,
    report_dir: Path = Path("bench-micro"),
    log: Callable[[str], None] = print,
) -> dict:
    names = parse_paths(paths)
    config = BenchConfig(height, width, steps=1, batch=batch, guidance=guidance, runs=runs, warmup=warmup)
    config.check()
    subject = resolve(source_or_kiln)
    config = config.sized(subject.native_size)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    environment = env.environment()

    calls = [
        ("time_component", {"component": c, "feeds": component_feeds(subject.info, c, config)}) for c in components
    ]
    with BenchSession(subject, names, config, log, one_at_a_time) as session:
        for run, index, seconds, measured in session.interleaved(calls, runs, warmup):
            if measured:
                run.samples.append({"component": components[index], "seconds": seconds})
    environment["load_average_end"] = env.load_average()

    result = {
        "format": "diffkiln-bench-micro/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "subject": subject.to_json(),
        "config": {"height": config.height, "width": config.width, "batch": batch, "cfg": config.cfg, "runs": runs},
        "environment": environment,
        "machine_peak": session.machine,
        "flops": session.flops,
        "components": {c: _component_summary(c, session) for c in components},
        "skipped_or_failed": {r.name: f"{r.status}: {r.reason}" for r in session.runs if r.status != "ok"},
        "warnings": [*session.warnings, *filter(None, [env.busy_warning(environment)])],
    }
    report.write_json(result, out / "micro.json")
    (out / "micro.md").write_text(_markdown(report.clean(result)), encoding="utf-8")
    log(f"wrote {out / 'micro.md'}")
    return report.clean(result)


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


def _markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"# diffkiln micro-benchmarks: {result['subject']['ref']}, {c['height']}×{c['width']}, batch {c['batch']}"
        f"{' (UNet on 2·batch rows: CFG)' if c['cfg'] else ''}, median of {c['runs']} calls",
        "",
        f"CPU: {result['environment']['cpu']['model']}; load average start / end: "
        f"{result['environment']['load_average_start']} / {result['environment']['load_average_end']}",
        "",
        "| component | path | median ms (min–max) | GFLOP/s | of GEMM peak | speedup vs torch-fp32 |",
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
    lines += ["", *[f"- `{name}`: {why}" for name, why in result["skipped_or_failed"].items()]]
    lines += [f"- **warning**: {w}" for w in result["warnings"]]
    return "\n".join(lines) + "\n"
