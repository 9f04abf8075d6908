"""Load a diffkiln kiln dir in optimum (or optimum-intel) unchanged and compare its image with `diffkiln run`'s.

Run with the Python of an environment that has optimum, NOT diffkiln's (this script imports no diffkiln):

    python3 -m venv /tmp/optvenv
    /tmp/optvenv/bin/pip install torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0" diffusers pillow
    diffkiln export tiny -o /tmp/k && python -c "import numpy; numpy.save('/tmp/l.npy',
        numpy.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=numpy.float32))"
    diffkiln run "a red circle" -m /tmp/k --steps 4 --sampler ddim --latents /tmp/l.npy -o /tmp/d.png
    /tmp/optvenv/bin/python tools/check_optimum.py /tmp/k "a red circle" --steps 4 --latents /tmp/l.npy \\
        --expect /tmp/d.png

It loads KILN with `ORTStableDiffusionPipeline` / `ORTStableDiffusionXLPipeline` (optimum-onnx), or with
`--intel` with `OVStableDiffusionPipeline[XL].from_pretrained(KILN, from_onnx=True)` (optimum-intel, installed
with `pip install --no-deps optimum-intel` beside openvino), generates from the same latents with the kiln's own
scheduler, and prints the maximum pixel difference and the PSNR against `--expect`; exit status 1 when they
differ by more than `--max-diff` (default 0: pixel-identical). `--clip-skip N` passes diffusers' clip_skip
(it reads the text encoder's hidden_states.* outputs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kiln")
    ap.add_argument("prompt")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--latents", required=True, help=".npy [1, 4, h, w], the noise `diffkiln run --latents` took")
    ap.add_argument("--expect", required=True, help="the PNG `diffkiln run` wrote")
    ap.add_argument("--clip-skip", type=int)
    ap.add_argument("--intel", action="store_true", help="optimum-intel's OpenVINO pipeline instead")
    ap.add_argument("--max-diff", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from PIL import Image

    kiln = Path(args.kiln)
    sdxl = "text_encoder_2" in json.loads((kiln / "model_index.json").read_text())
    pipe = load(kiln, sdxl, args.intel)
    latents = torch.from_numpy(np.load(args.latents))
    kw = {"clip_skip": args.clip_skip} if args.clip_skip else {}
    # diffkiln zeroes SDXL's uncond rows for an empty negative prompt; diffusers does so for negative_prompt=None
    out = pipe(
        args.prompt,
        negative_prompt=None if sdxl else "",
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        latents=latents,
        height=latents.shape[2] * 8,
        width=latents.shape[3] * 8,
        output_type="np",
        **kw,
    ).images
    got = (out[0] * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    want = np.asarray(Image.open(args.expect).convert("RGB"))
    diff = np.abs(got.astype(int) - want.astype(int))
    mse = float((diff**2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    print(f"{type(pipe).__name__}: max pixel diff {diff.max()}, PSNR {psnr:.1f} dB vs {args.expect}")
    return 0 if diff.max() <= args.max_diff else 1


def load(kiln: Path, sdxl: bool, intel: bool):
    if intel:
        from optimum.intel import OVStableDiffusionPipeline, OVStableDiffusionXLPipeline

        cls = OVStableDiffusionXLPipeline if sdxl else OVStableDiffusionPipeline
        return cls.from_pretrained(kiln, from_onnx=True, compile=True, ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

    cls = ORTStableDiffusionXLPipeline if sdxl else ORTStableDiffusionPipeline
    return cls.from_pretrained(kiln)


if __name__ == "__main__":
    sys.exit(main())
