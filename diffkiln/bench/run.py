"""`run_bench`: every requested path on the same calls, interleaved, then the report.

Two kinds of call share the skeleton (config → subject → session → interleaved rounds → report): "generate",
whole generations on the same prompts and noise (report.md, report.json, plots, images/), and "components", one
call of each component on identical seeded inputs (bench/micro.py: report.md, report.json).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from diffkiln.bench import env, micro, plots, report
from diffkiln.bench.config import DEFAULT_PROMPTS, KINDS, WARMUP_STEPS, BenchConfig, jobs
from diffkiln.bench.paths import DEFAULT_PATHS, REFERENCE, parse_paths
from diffkiln.bench.session import BenchSession
from diffkiln.bench.subject import resolve
from diffkiln.bench.summary import adherence_scores, summarize_paths
from diffkiln.errors import DiffkilnError, OutputError

FORMAT = "diffkiln-bench/1"


def run_bench(
    source_or_kiln: str,
    paths: Sequence[str] | str = DEFAULT_PATHS,
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int = 20,
    batch: int = 1,
    scheduler: str = "euler",
    guidance: float | None = None,
    prompts: Sequence[str] | None = None,
    negative: str = "",
    runs: int = 3,
    warmup: int = 1,
    seed: int = 0,
    one_at_a_time: bool = False,
    kind: str = "generate",
    report_dir: Path = Path("bench-report"),
    log: Callable[[str], None] = print,
) -> dict:
    """Benchmark `paths` on a preset, diffusers folder or kiln directory; write report.md, report.json, PNG plots
    and images/ under `report_dir`; return the report (what report.json holds).

    height/width default to the model's native size, guidance to the model's (7.5; Flux: 3.5, its distilled
    guidance; Flux samples with flow-matching Euler only). Each of `runs` rounds generates every prompt once on every
    path, after `warmup` unrecorded rounds of the same generations cut to WARMUP_STEPS steps (same shapes, so every
    one-time cost is paid). Paths that cannot run here are reported as skipped, with the reason.
    `one_at_a_time` keeps a single path in memory (each round starts, loads, warms up and closes every path in
    turn) for machines that cannot hold all paths at once; paths then alternate round by round.
    `kind="components"` times one call of each component (UNet or Flux transformer step, VAE decode) instead of
    generations.
    """
    if kind not in KINDS:
        raise DiffkilnError(f"unknown bench kind {kind!r}; choose one of {', '.join(KINDS)}")
    names = parse_paths(paths)
    config = BenchConfig(
        height,
        width,
        steps,
        batch,
        scheduler,
        guidance,
        tuple(prompts or DEFAULT_PROMPTS),
        negative,
        runs,
        warmup,
        seed,
    )
    config.check()
    out = _report_dir(Path(report_dir))
    subject = resolve(source_or_kiln)
    config = config.fitted(subject.info, subject.native_size)
    environment = env.environment()
    started = time.perf_counter()

    if kind == "generate":
        work = jobs(config, subject.info.latent_channels)
        calls = [("generate", {"job": job}) for job in work]
        warmup_calls = [("generate", {"job": replace(job, steps=min(job.steps, WARMUP_STEPS))}) for job in work]
    else:
        components = micro.components(subject.info)
        calls = warmup_calls = micro.calls(subject, config)
    with BenchSession(subject, names, config, log, one_at_a_time) as session:
        for run, index, result, measured in session.interleaved(calls, config.runs, config.warmup, warmup_calls):
            note = "" if measured else " (warm-up)"
            if kind == "components":
                log(f"  {run.name}: {components[index]} in {result * 1e3:.1f} ms{note}")
                if measured:
                    micro.record(run, components[index], result)
                continue
            log(f"  {run.name}: prompt {index + 1} in {result['stages']['total']:.2f} s{note}")
            if measured:
                run.images[index] = result["images"]
                run.samples.append({"prompt": index, **result["stages"]})
    environment["load_average_end"] = env.load_average()

    result = {
        "format": FORMAT if kind == "generate" else micro.FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": time.perf_counter() - started,
        "subject": subject.to_json(),
        "config": {
            **asdict(config),
            "prompts": list(config.prompts),
            "paths_requested": names,
            "cfg": config.cfg,
            "one_at_a_time": one_at_a_time,
            "kind": kind,
        },
        "environment": environment,
        "machine_peak": session.machine,
        "flops": session.flops,
        "reference": REFERENCE,
        "warnings": [*session.warnings, *filter(None, [env.busy_warning(environment)])],
        "method": report.method(),
    }
    if kind == "components":
        result["paths"] = {r.name: {"status": r.status, "reason": r.reason} for r in session.runs}
        result.update(micro.summarize(session))
        _write_tables(result, out, micro.markdown, micro.console_summary, log)
        return report.clean(result)
    result["paths"] = summarize_paths(session, config)
    result["adherence"] = adherence_scores(session.runs, config.prompts, (subject.ref, subject.source_ref))
    write(result, session.runs, out, log)
    return report.clean(result)


def write(result: dict, runs, out: Path, log: Callable[[str], None]) -> None:
    """report.json, report.md, images/ and the plots, into `out`."""
    result["files"] = {"images": report.save_images(runs, out), "plots": plots.write_plots(result, runs, out)}
    result["files"].update(json="report.json", markdown="report.md")
    _write_tables(result, out, report.markdown, report.console_summary, log)


def _write_tables(result: dict, out: Path, markdown: Callable, console: Callable, log: Callable[[str], None]) -> None:
    report.write_json(result, out / "report.json")
    lines = markdown(report.clean(result)) + report.method_lines(result["method"])
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in console(report.clean(result)):
        log(line)
    log(f"wrote {out / 'report.md'}")


def _report_dir(path: Path) -> Path:
    """Create the report folder up front, so a bad --report fails before minutes of work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write the report to {path}: {e.strerror}") from None
    return path
