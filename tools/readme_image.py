"""Draw docs/demo.png, the README's picture: the demo model through `diffkiln run`'s runtime (ONNX Runtime, defaults:
euler, 20 steps, guidance 7.5, seed 0) for a few prompts, top row as exported, bottom row with the demo LoRA folded
into the graphs. Tiles are upscaled 3× (nearest) so the 64×64 images stay visible.

    .venv/bin/python tools/readme_image.py [-o docs/demo.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from diffkiln.demo import sampling
from diffkiln.lora import fold_loras
from diffkiln.models import resolve_model
from diffkiln.runtime.pipeline import GenerationParams, Pipeline

PROMPTS = (
    "a red circle on a white background",
    "a large yellow triangle on a blue background",
    "a small green square on a black background",
    "a cyan diamond on a purple background",
    "a large white circle on a red background",
    "a blue triangle on a yellow background",
)
SCALE = 3


def row(kiln_dir: Path) -> np.ndarray:
    with Pipeline(kiln_dir) as pipe:
        tiles = [pipe(GenerationParams(prompt)).to_uint8()[0] for prompt in PROMPTS]
    return np.concatenate(tiles, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("docs/demo.png"))
    args = parser.parse_args()
    kiln_dir = resolve_model(None)
    with tempfile.TemporaryDirectory() as tmp:
        pink = Path(tmp) / "pink"
        fold_loras(kiln_dir, [(sampling.LORA, 1.0)], pink, log=lambda _msg: None)
        grid = np.concatenate([row(kiln_dir), row(pink)], axis=0)
    image = Image.fromarray(grid)
    image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
