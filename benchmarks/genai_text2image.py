"""One image through OpenVINO GenAI's Text2ImagePipeline from given initial latents, timed like diffkiln-cpp.

    python benchmarks/genai_text2image.py IR_DIR PROMPT LATENTS.npy OUT.png [--steps N] [--guidance G]
        [--negative TEXT]

IR_DIR is tools/write_openvino_ir.py's output. Runs in a venv with openvino-genai (diffkiln is not imported).
The latents enter through a `Generator` subclass whose `randn_tensor` hands back the .npy array, so GenAI starts
from the same noise as `diffkiln run --latents` / `diffkiln-cpp --latents`. Prints load / generate / total
seconds; the PNG is written with the same stored-deflate writer idea as diffkiln-cpp (no Pillow needed).
"""

from __future__ import annotations

import argparse
import struct
import time
import zlib
from pathlib import Path

import numpy as np


def write_png(path: Path, rgb: np.ndarray) -> None:
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def main() -> None:
    start = time.perf_counter()
    import openvino as ov
    import openvino_genai

    parser = argparse.ArgumentParser()
    parser.add_argument("ir", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("latents", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--negative", default="")
    args = parser.parse_args()
    latents = np.load(args.latents).astype(np.float32)

    class GivenNoise(openvino_genai.Generator):
        """Hands GenAI the .npy latents as its initial noise."""

        def __init__(self, noise: np.ndarray):
            super().__init__()
            self.noise = noise

        def next(self) -> float:
            raise RuntimeError("only randn_tensor is expected (txt2img with a deterministic scheduler)")

        def randn_tensor(self, shape) -> ov.Tensor:
            if tuple(shape) != self.noise.shape:
                raise RuntimeError(f"GenAI asks for noise {tuple(shape)}, the file holds {self.noise.shape}")
            return ov.Tensor(self.noise.copy())

    pipe = openvino_genai.Text2ImagePipeline(str(args.ir), "CPU", INFERENCE_PRECISION_HINT="f32")
    loaded = time.perf_counter()
    kw = {"negative_prompt": args.negative} if args.negative else {}
    image = pipe.generate(
        args.prompt,
        width=latents.shape[3] * 8,
        height=latents.shape[2] * 8,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=GivenNoise(latents),
        **kw,
    )
    done = time.perf_counter()
    write_png(args.out, np.asarray(image.data)[0])
    print(f"  load {1000 * (loaded - start):.1f} ms, generate {1000 * (done - loaded):.1f} ms")
    print(f"  total {1000 * (time.perf_counter() - start):.1f} ms")


if __name__ == "__main__":
    main()
