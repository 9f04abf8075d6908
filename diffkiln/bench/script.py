"""The command line of the scripted benchmarks in benchmarks/: their settings sit at the top of each script, and
any of them may be overridden here (e.g. `--source KILN_DIR` to reuse an export, `--paths` to bench fewer)."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse(settings: dict, description: str) -> dict:
    """The script's settings, with whatever the command line overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--source", default=settings["source"], help="preset, diffusers folder or kiln directory")
    parser.add_argument("--paths", default=settings["paths"], help="comma-separated bench paths")
    for name in ("height", "width", "steps", "batch", "runs", "warmup"):
        if name in settings:
            parser.add_argument(f"--{name}", type=int, default=settings[name])
    if "scheduler" in settings:
        parser.add_argument("--scheduler", default=settings["scheduler"])
    if "guidance" in settings:
        parser.add_argument("--guidance", type=float, default=settings["guidance"])
    parser.add_argument("--report", type=Path, default=settings["report"], help="where the report is written")
    parser.add_argument("--one-at-a-time", action="store_true", help="one path in memory at a time (less RAM)")
    args = vars(parser.parse_args())
    return {**settings, **args}


def run_scripted(settings: dict, description: str) -> dict:
    """Parse the command line and run the bench those settings describe."""
    from diffkiln.bench.run import run_bench

    s = parse(settings, description)
    keys = ("height", "width", "steps", "batch", "scheduler", "guidance", "prompts", "runs", "warmup", "one_at_a_time")
    keys += ("kind",)
    return run_bench(s["source"], s["paths"], report_dir=s["report"], **{k: s[k] for k in keys if k in s})
