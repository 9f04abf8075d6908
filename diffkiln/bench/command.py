"""Click options for `diffkiln bench` and the function the command calls, so cli.py stays a thin wrapper:

@main.command()
@click.argument("source", required=False)
@click_options
@user_errors
def bench(source, **options):
    \"\"\"Benchmark the PyTorch reference and every diffkiln path side by side.\"\"\"
    bench_command(source, **options, echo=lambda msg: click.echo(msg, err=True))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from diffkiln.bench.config import DEFAULT_GUIDANCE, FLUX_GUIDANCE, KINDS, read_prompts
from diffkiln.bench.paths import DEFAULT_PATHS, PATHS
from diffkiln.runtime.schedulers import REGISTRY

OPTIONS = [
    click.option(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        show_default=True,
        help=f"Comma-separated paths to compare: {', '.join(PATHS)}. Ones that cannot run here are reported as "
        "skipped, with the reason.",
    ),
    click.option("--height", type=int, help="Image height in pixels (default: the model's native size)."),
    click.option("--width", type=int, help="Image width in pixels (default: the model's native size)."),
    click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True),
    click.option("--batch", type=click.IntRange(1, 64), default=1, show_default=True, help="Images per prompt."),
    click.option("--sampler", "--scheduler", "scheduler", default="euler", show_default=True, help=", ".join(REGISTRY)),
    click.option(
        "--guidance",
        type=float,
        help=f"CFG scale (≤1: off; default {DEFAULT_GUIDANCE}); Flux: its distilled guidance (default "
        f"{FLUX_GUIDANCE}).",
    ),
    click.option(
        "--prompts",
        "prompts_file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="File with one prompt per line (default: two built-in prompts).",
    ),
    click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Measured rounds."),
    click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Unrecorded rounds first."),
    click.option("--seed", type=int, default=0, show_default=True, help="Prompt i's noise uses seed + i."),
    click.option(
        "--one-at-a-time",
        is_flag=True,
        help="Keep one path in memory at a time (reloaded every round) when all of them do not fit together.",
    ),
    click.option(
        "--kind",
        type=click.Choice(KINDS),
        default="generate",
        show_default=True,
        help="What each timed call is: a whole generation, or one call of each component (a CFG UNet step, one VAE "
        "decode) on identical seeded inputs: where the end-to-end differences come from.",
    ),
    click.option(
        "--report",
        "report_dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=Path("bench-report"),
        show_default=True,
        help="Folder for report.md, report.json, the PNG plots and images/.",
    ),
]


def click_options(fn):
    """Apply every `diffkiln bench` option to a click command function."""
    for option in reversed(OPTIONS):
        fn = option(fn)
    return fn


def bench_command(source: str | None, *, prompts_file: Path | None = None, echo: Callable = print, **options) -> dict:
    """What `diffkiln bench` does: read the prompts file, run the bench, print one line per path."""
    from diffkiln.bench.run import run_bench
    from diffkiln.models import DEFAULT_MODEL

    prompts = read_prompts(prompts_file) if prompts_file else None
    return run_bench(source or DEFAULT_MODEL, options.pop("paths"), prompts=prompts, log=echo, **options)
