"""The headline: the SD1.5 architecture at 512², 20 Euler steps, CFG 7.5, batch 1 — the PyTorch reference and
every diffkiln path side by side, in one run.

    .venv/bin/python benchmarks/bench_sd15_512.py [--source KILN_DIR] [--paths a,b] [--runs N] [--report DIR]

The `sd15` preset has the real architecture with seeded random weights: speed and memory are SD1.5's, the images
are noise (fidelity still compares every path with PyTorch's image for the same noise). The first run exports the
preset into the user cache (~2 minutes) and optimizes it; later runs reuse both.
Every path stays resident for the whole run (they are interleaved call by call), ~5–7 GB each at 512²: on a machine
without that much free memory pass `--one-at-a-time` (each round reloads every path; paths then alternate round by
round) or fewer `--paths`. Paths that cannot run here are listed as skipped, with the reason.
Results: benchmarks/results/sd15_512/ (report.md, report.json, PNG plots, images/) — not committed.
"""

from pathlib import Path

from diffkiln.bench.script import run_scripted

SETTINGS = {
    "source": "sd15",
    "paths": "torch-fp32,torch-bf16,ort-fp32,ort-opt,ort-fp16,ort-int8,ort-sdopt,openvino-fp32,openvino-bf16,trt-fp16",
    "height": 512,
    "width": 512,
    "steps": 20,
    "scheduler": "euler",
    "guidance": 7.5,
    "batch": 1,
    "prompts": ("a photograph of an astronaut riding a horse on the moon",),
    "runs": 3,
    "warmup": 1,  # a warm-up generation is cut to 2 steps: same shapes and kernels at a tenth of the cost
    "report": Path(__file__).parent / "results" / "sd15_512",
}

if __name__ == "__main__":
    run_scripted(SETTINGS, __doc__.split("\n\n")[0])
