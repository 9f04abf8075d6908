"""The quick headline: the SD1.5 architecture at 256², 20 Euler steps, CFG 7.5, batch 1 (about 4× cheaper than
512², same paths). See bench_sd15_512.py for what is measured.

    .venv/bin/python benchmarks/bench_sd15_256.py [--source KILN_DIR] [--paths a,b] [--runs N] [--report DIR]

Results: benchmarks/results/sd15_256/ — not committed.
"""

from pathlib import Path

from diffkiln.bench.script import run_scripted

SETTINGS = {
    "source": "sd15",
    "paths": "torch-fp32,torch-bf16,ort-fp32,ort-opt,ort-fp16,ort-int8,ort-sdopt,openvino-fp32,openvino-bf16,trt-fp16",
    "height": 256,
    "width": 256,
    "steps": 20,
    "scheduler": "euler",
    "guidance": 7.5,
    "batch": 1,
    "prompts": ("a photograph of an astronaut riding a horse on the moon",),
    "runs": 3,
    "warmup": 1,
    "report": Path(__file__).parent / "results" / "sd15_256",
}

if __name__ == "__main__":
    run_scripted(SETTINGS, __doc__.split("\n\n")[0])
