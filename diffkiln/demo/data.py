"""Synthetic captioned shapes: the training data of diffkiln's demo model, generated in code (numpy + Pillow only).

Each image is 64×64 RGB: one flat-colored shape on a flat background. Five attributes describe it, and its caption
names them in a fixed grammar:

    a [small|large] <color> <shape>[ on a <background> background][, <position>]

e.g. "a small red circle on a blue background, top left". Training captions sometimes leave out the size, the
background or the position (the image still has one), so a user may prompt "a red circle" and get a sensible
picture; held-out captions always name all five.

Held-out split: `heldout_triples()` reserves 32 (shape, color, background) combinations that the training set never
shows (every pair inside them still occurs in training), so the 64 held-out captions test composition rather than
memory. Everything is deterministic from a seed: the same seed gives the same pixels and captions on any machine.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "HELDOUT_SEED",
    "IMAGE_SIZE",
    "LORA_BACKGROUND",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "caption_of",
    "heldout_captions",
    "heldout_scenes",
    "heldout_triples",
    "make_dataset",
    "parse_caption",
    "render",
    "sample_scenes",
]

IMAGE_SIZE = 64

#: Named colors (sRGB). Chosen far apart (closest pair: 130 RGB units) so "nearest named color" is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (160, 40, 170),
    "cyan": (30, 200, 220),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
#: Position name -> shape center as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.30, 0.30),
    "top right": (0.70, 0.30),
    "bottom left": (0.30, 0.70),
    "bottom right": (0.70, 0.70),
    "center": (0.50, 0.50),
}
#: Size name -> half-extent of the shape's bounding box as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.14, "large": 0.235}

HELDOUT_SEED = 0
LORA_BACKGROUND = (255, 105, 180)  # pink: the demo LoRA paints every background so, far from every named color
N_HELDOUT_TRIPLES = 32  # × 2 (position, size) variants = 64 held-out captions

# Jitter that makes every training image distinct while keeping its caption true.
_CENTER_JITTER = 0.03  # fraction of the side
_SIZE_JITTER = 0.012  # fraction of the side
_COLOR_JITTER = 12  # per RGB channel
# Probability that a training caption leaves an attribute out.
_DROP = {"size": 0.15, "background": 0.1, "position": 0.15}
_SUPERSAMPLE = 4  # draw at 4× and box-filter down: anti-aliased edges, like a photo of a shape

_CAPTION_RE = re.compile(
    r"^a (?:(?P<size>{sizes}) )?(?P<color>{colors}) (?P<shape>{shapes})"
    r"(?: on a (?P<background>{colors}) background)?(?:, (?P<position>{positions}))?$".format(
        sizes="|".join(SIZES), colors="|".join(COLORS), shapes="|".join(SHAPES), positions="|".join(POSITIONS)
    )
)


@dataclass(frozen=True)
class Scene:
    """What one image shows: the five attribute names (values are keys of SHAPES, COLORS, POSITIONS, SIZES)."""

    shape: str
    color: str
    background: str
    position: str
    size: str

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.shape, self.color, self.background)


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------


def caption_of(scene: Scene, omit: frozenset[str] = frozenset()) -> str:
    """The caption for `scene`, leaving out the attributes in `omit` (a subset of size, background, position)."""
    text = "a " + ("" if "size" in omit else scene.size + " ") + f"{scene.color} {scene.shape}"
    if "background" not in omit:
        text += f" on a {scene.background} background"
    if "position" not in omit:
        text += f", {scene.position}"
    return text


def parse_caption(caption: str) -> dict[str, str | None]:
    """Caption -> {shape, color, background, position, size}; attributes the caption leaves out are None.

    Raises ValueError for text outside the demo grammar (so a typo cannot silently score as "not mentioned").
    """
    match = _CAPTION_RE.match(" ".join(caption.lower().split()))
    if match is None:
        raise ValueError(f"not a demo caption: {caption!r}")
    return match.groupdict()


# ---------------------------------------------------------------------------------------------------------------
# Scenes and the held-out split
# ---------------------------------------------------------------------------------------------------------------


def all_triples() -> list[tuple[str, str, str]]:
    """Every (shape, color, background) with color != background: 4 × 8 × 7 = 224."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLORS, COLORS) if c != b]


def heldout_triples(seed: int = HELDOUT_SEED) -> frozenset[tuple[str, str, str]]:
    """32 (shape, color, background) combinations the training set never shows.

    Each uses a different (color, background) pair and each shape is held out 8 times, so training still sees every
    (color, background) pair with three shapes and every (shape, color) pair with most backgrounds.
    """
    rng = np.random.default_rng(seed)
    pairs = [(c, b) for c, b in itertools.product(COLORS, COLORS) if c != b]
    chosen = rng.permutation(len(pairs))[:N_HELDOUT_TRIPLES]
    shapes = np.resize(np.array(SHAPES), N_HELDOUT_TRIPLES)  # 8 of each shape
    return frozenset((str(s), *pairs[i]) for s, i in zip(shapes, chosen, strict=True))


def heldout_scenes(seed: int = HELDOUT_SEED) -> list[Scene]:
    """The 64 held-out scenes: each held-out triple at two (position, size) variants, balanced over all ten."""
    variants = list(itertools.product(POSITIONS, SIZES))  # 10, index = 2 * position + size
    rng = np.random.default_rng(seed + 1)
    first = rng.permutation(np.resize(np.arange(len(variants)), N_HELDOUT_TRIPLES))
    second = (first + len(variants) // 2) % len(variants)  # +5: another position and the other size
    scenes = []
    for triple, a, b in zip(sorted(heldout_triples(seed)), first, second, strict=True):
        for position, size in (variants[a], variants[b]):
            scenes.append(Scene(*triple, position=position, size=size))
    return scenes


def heldout_captions(seed: int = HELDOUT_SEED) -> list[str]:
    """The 64 fixed held-out captions (all five attributes named), in a stable order."""
    return [caption_of(scene) for scene in heldout_scenes(seed)]


def sample_scenes(n: int, rng: np.random.Generator, heldout_seed: int = HELDOUT_SEED) -> list[Scene]:
    """`n` uniformly random scenes whose (shape, color, background) is not held out."""
    excluded = heldout_triples(heldout_seed)
    triples = [t for t in all_triples() if t not in excluded]  # 192
    positions, sizes = list(POSITIONS), list(SIZES)
    picks = rng.integers(0, [len(triples), len(positions), len(sizes)], size=(n, 3))
    return [Scene(*triples[t], position=positions[p], size=sizes[s]) for t, p, s in picks]


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _jittered(color: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    rgb = np.array(color) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices for the polygon shapes (bounding box [cx±r, cy±r]); None for the circle and square."""
    if shape == "triangle":  # apex up, base at the bottom of the box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def render(
    scene: Scene,
    rng: np.random.Generator | None = None,
    size: int = IMAGE_SIZE,
    rgb: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Draw `scene` -> uint8 (size, size, 3). With `rng`, center, size and colors are jittered; without, exact.

    `rgb` = (fill, background) paints other colors than the scene names (used to widen the autoencoder's training
    colors and for the demo LoRA's restyled images); they are jittered like the named ones.
    """
    jitter = rng is not None
    fx, fy = POSITIONS[scene.position]
    half = SIZES[scene.size]
    if jitter:
        fx, fy = np.array([fx, fy]) + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER, size=2)
        half += rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
    fill, background = rgb or (COLORS[scene.color], COLORS[scene.background])
    if jitter:
        fill, background = _jittered(fill, rng), _jittered(background, rng)

    big = size * _SUPERSAMPLE
    cx, cy, r = fx * big, fy * big, half * big
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_outline(scene.shape, cx, cy, r), fill=fill)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))


def _omitted(rng: np.random.Generator) -> frozenset[str]:
    draws = rng.random(len(_DROP))
    return frozenset(name for (name, p), u in zip(_DROP.items(), draws, strict=True) if u < p)


def make_dataset(n: int, seed: int, heldout_seed: int = HELDOUT_SEED) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`n` training examples -> (images uint8 (n, 64, 64, 3), captions, scenes). Same seed, same data."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng, heldout_seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i, scene in enumerate(scenes):
        images[i] = render(scene, rng)
        captions.append(caption_of(scene, _omitted(rng)))
    return images, captions, scenes
