"""Fidelity on a model that draws something: diffkiln's demo model on its held-out captions, every path against
PyTorch (PSNR, SSIM and, where diffkiln.eval.adherence is available, prompt adherence).

    .venv/bin/python benchmarks/bench_demo.py [--source DIR] [--paths a,b] [--runs N] [--report DIR]

The demo model is the bundled diffkiln/assets/demo. Results: benchmarks/results/demo/ — not committed.
"""

from pathlib import Path

from diffkiln.bench.script import run_scripted
from diffkiln.demo.data import heldout_captions

SETTINGS = {
    "source": "demo",
    "paths": "torch-fp32,torch-bf16,ort-fp32,ort-opt,ort-fp16,ort-int8,ort-sdopt,openvino-fp32,openvino-bf16,trt-fp16",
    "steps": 20,  # native size: the demo model draws 64×64 images
    "scheduler": "euler",
    "guidance": 7.5,
    "batch": 1,
    "prompts": tuple(heldout_captions()[:8]),  # held-out captions: combinations the model never saw in training
    "runs": 2,
    "warmup": 1,
    "report": Path(__file__).parent / "results" / "demo",
}

if __name__ == "__main__":
    run_scripted(SETTINGS, __doc__.split("\n\n")[0])
