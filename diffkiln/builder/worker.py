"""One engine build in its own process: `python -m diffkiln.builder.worker < job.json` (see build.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffkiln.builder.trt import BuildOptions, write_engine_from_onnx
from diffkiln.errors import DiffkilnError


def main() -> int:
    job = json.loads(sys.stdin.read())
    profiles = {k: tuple(tuple(s) for s in v) for k, v in job["profiles"].items()}
    cache = Path(job["timing_cache"]) if job.get("timing_cache") else None
    try:
        write_engine_from_onnx(Path(job["onnx"]), Path(job["plan"]), profiles, BuildOptions(**job["options"]), cache)
    except DiffkilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
