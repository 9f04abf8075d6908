"""Micro-benchmarks: one UNet call (a CFG step: 2 rows) and one VAE decode per path, on identical seeded inputs,
interleaved across paths — where the end-to-end differences come from (`diffkiln bench --kind components`).

    .venv/bin/python benchmarks/micro_components.py [--source sd15|KILN_DIR] [--height 512] [--paths a,b] [--runs N]

Results: benchmarks/results/micro_<source>_<height>/ (report.md, report.json) — not committed.
"""

import re
from pathlib import Path

from diffkiln.bench.script import parse, run_scripted

SETTINGS = {
    "source": "sd15",
    "paths": "torch-fp32,torch-bf16,ort-fp32,ort-opt,ort-fp16,ort-int8,ort-sdopt,openvino-fp32,openvino-bf16,trt-fp16",
    "kind": "components",
    "height": 512,
    "width": 512,
    "batch": 1,
    "guidance": 7.5,  # > 1: the UNet runs on [uncond; cond], 2·batch rows, as in a guided step
    "runs": 5,
    "warmup": 1,
    "report": None,  # default: benchmarks/results/micro_<source>_<height>
}

if __name__ == "__main__":
    s = parse(SETTINGS, __doc__.split("\n\n")[0])
    slug = re.sub(r"[^\w.-]+", "_", Path(s["source"]).name)
    SETTINGS["report"] = s["report"] or Path(__file__).parent / "results" / f"micro_{slug}_{s['height']}"
    run_scripted(SETTINGS, __doc__.split("\n\n")[0])
