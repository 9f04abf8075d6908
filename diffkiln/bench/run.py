"""`run_bench`: every requested path on the same prompts and noise, interleaved, then the report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from diffkiln.bench import env, plots, report
from diffkiln.bench.config import DEFAULT_PROMPTS, BenchConfig, jobs
from diffkiln.bench.paths import DEFAULT_PATHS, REFERENCE, parse_paths
from diffkiln.bench.session import BenchSession
from diffkiln.bench.subject import resolve
from diffkiln.bench.summary import adherence_scores, summarize_paths
from diffkiln.errors import OutputError

FORMAT = "diffkiln-bench/1"
WARMUP_STEPS = 2  # warm-up generations: every kernel, shape and arena of a full one, at a tenth of the cost


def run_bench(
    source_or_kiln: str,
    paths: Sequence[str] | str = DEFAULT_PATHS,
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int = 20,
    batch: int = 1,
    scheduler: str = "euler",
    guidance: float = 7.5,
    prompts: Sequence[str] | None = None,
    negative: str = "",
    runs: int = 3,
    warmup: int = 1,
    seed: int = 0,
    one_at_a_time: bool = False,
    report_dir: Path = Path("bench-report"),
    log: Callable[[str], None] = print,
) -> dict:
    """Benchmark `paths` on a preset, diffusers folder or kiln directory; write report.md, report.json, PNG plots
    and images/ under `report_dir`; return the report (what report.json holds).

    height/width default to the model's native size. Each of `runs` rounds generates every prompt once on every
    path, after `warmup` unrecorded rounds of the same generations cut to WARMUP_STEPS steps (same shapes, so every
    one-time cost is paid). Paths that cannot run here are reported as skipped, with the reason.
    `one_at_a_time` keeps a single path in memory (each round starts, loads, warms up and closes every path in
    turn) for machines that cannot hold all paths at once; paths then alternate round by round.
    """
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
    config = config.sized(subject.native_size)
    environment = env.environment()
    started = time.perf_counter()

    work = jobs(config, subject.info.latent_channels)
    calls = [("generate", {"job": job}) for job in work]
    warmup_calls = [("generate", {"job": replace(job, steps=min(job.steps, WARMUP_STEPS))}) for job in work]
    with BenchSession(subject, names, config, log, one_at_a_time) as session:
        for run, index, result, measured in session.interleaved(calls, config.runs, config.warmup, warmup_calls):
            note = "" if measured else " (warm-up)"
            log(f"  {run.name}: prompt {index + 1} in {result['stages']['total']:.2f} s{note}")
            if measured:
                run.images[index] = result["images"]
                run.samples.append({"prompt": index, **result["stages"]})
    environment["load_average_end"] = env.load_average()

    result = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": time.perf_counter() - started,
        "subject": subject.to_json(),
        "config": {
            **asdict(config),
            "prompts": list(config.prompts),
            "paths_requested": names,
            "cfg": config.cfg,
            "one_at_a_time": one_at_a_time,
        },
        "environment": environment,
        "machine_peak": session.machine,
        "flops": session.flops,
        "reference": REFERENCE,
        "paths": summarize_paths(session, config),
        "adherence": adherence_scores(session.runs, config.prompts, (subject.ref, subject.source_ref)),
        "warnings": [*session.warnings, *filter(None, [env.busy_warning(environment)])],
        "method": report.METHOD,
    }
    write(result, session.runs, out, log)
    return report.clean(result)


def write(result: dict, runs, out: Path, log: Callable[[str], None]) -> None:
    """report.json, report.md, images/ and the plots, into `out`."""
    result["files"] = {"images": report.save_images(runs, out), "plots": plots.write_plots(result, runs, out)}
    result["files"].update(json="report.json", markdown="report.md")
    report.write_json(result, out / "report.json")
    (out / "report.md").write_text(report.markdown(report.clean(result)), encoding="utf-8")
    for line in report.console_summary(report.clean(result)):
        log(line)
    log(f"wrote {out / 'report.md'}")


def _report_dir(path: Path) -> Path:
    """Create the report folder up front, so a bad --report fails before minutes of work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write the report to {path}: {e.strerror}") from None
    return path
