"""Prompt adherence for the demo model: does an image show what its caption asks for? (numpy + Pillow only.)

The evaluator reads pixels only, so it scores any backend (PyTorch reference, ONNX Runtime, TensorRT) the same way:

1. background: median color of a thin border frame; if the frame is not roughly uniform there is no background
   (noise, clutter) and nothing else is estimated;
2. shape mask: pixels farther than `MASK_DISTANCE` from the background color, largest 4-connected component;
   fewer than `MIN_AREA` of the image means "no shape" (a blank image). Once the shape color is known (step 3),
   the mask is re-cut halfway between the two colors so blur does not change the shape's outline;
3. color: nearest named color (`diffkiln.demo.data.COLORS`) to the median of the mask's interior;
4. kind: nearest prototype in a 3-number description of the mask inside its bounding box,
       fill   = area / bbox area                      circle .78  square 1    triangle .50  diamond .50
       top    = share of the area in the bbox's upper half   .50         .50          .25           .50
       corner = mean occupancy of the four corner cells      .31         1            .37           0
   (values for ideal shapes; corner cells are a quarter of the box side), rejected if no prototype is close;
5. position: bounding-box center within `CENTER_BOX` of the image center is "center", else its quadrant;
   size: bounding-box extent over `LARGE_EXTENT` of the image side is "large".

`estimate(image)` returns the attributes (None where undetermined, which always scores wrong); `score(images,
captions)` returns accuracy per attribute over the captions that name it, plus per-image details.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from diffkiln.demo.data import COLORS, parse_caption

__all__ = ["ATTRIBUTES", "estimate", "nearest_color", "score"]

ATTRIBUTES = ("color", "background", "shape", "position", "size")

BORDER = 1 / 32  # border frame width, fraction of the side (2 px at 64)
BORDER_SPREAD = 30.0  # median RGB distance of frame pixels from their median above this: no uniform background
MASK_DISTANCE = 50.0  # RGB distance from the background that makes a pixel part of the shape
MIN_AREA = 0.01  # fraction of the image: smaller components are specks, not shapes
CENTER_BOX = 0.10  # |bbox center - image center| below this (fraction of the side, both axes): "center"
LARGE_EXTENT = 0.375  # bbox extent (fraction of the side) between small (~0.28) and large (~0.47) shapes
MAX_SHAPE_DISTANCE = 0.4  # feature distance beyond which a mask is no known shape

#: (fill, top, corner) of ideal shapes, measured on 400×400 analytic masks.
PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "circle": (0.781, 0.5, 0.31),
    "square": (1.0, 0.5, 1.0),
    "triangle": (0.499, 0.249, 0.374),
    "diamond": (0.498, 0.5, 0.0),
}

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float64)  # (K, 3)


def nearest_color(rgb: np.ndarray) -> str:
    """Name of the palette color closest (Euclidean, 0–255 RGB) to `rgb` (3,)."""
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]


def _as_rgb255(image: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3] or float [H,W,3] in [0, 1] -> float64 [H,W,3] in [0, 255]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64)
    return np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0


def _border_pixels(rgb: np.ndarray) -> np.ndarray:
    """The frame of width BORDER around the image -> (P, 3)."""
    k = max(1, round(rgb.shape[0] * BORDER))
    frame = np.ones(rgb.shape[:2], dtype=bool)
    frame[k:-k, k:-k] = False
    return rgb[frame]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean [H,W] mask (empty mask -> empty mask)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in `mask` (drops the anti-aliased rim)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _refine(rgb: np.ndarray, mask: np.ndarray, background: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Re-cut the shape at the midpoint between background and shape color, so blurred edges neither grow nor shrink
    it: keep pixels whose projection onto (color - background) passes halfway, inside the component's 1-px halo."""
    axis = color - background  # (3,)
    t = (rgb - background) @ axis / max(float(axis @ axis), 1e-6)  # (H, W), 0 = background, 1 = shape color
    halo = ~_erode(~mask)  # the component grown by one pixel
    refined = _largest_component(halo & (t > 0.5))
    return refined if refined.any() else mask


def shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill, top, corner) of a non-empty boolean mask, measured inside its bounding box (see module docstring)."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float64)  # (h, w)
    h, w = box.shape
    area = box.sum()
    top = box[: h // 2].sum() + (0.5 * box[h // 2].sum() if h % 2 else 0.0)  # odd height: half the middle row
    qh, qw = max(1, round(h / 4)), max(1, round(w / 4))
    corners = [box[:qh, :qw], box[:qh, -qw:], box[-qh:, :qw], box[-qh:, -qw:]]
    return float(area / (h * w)), float(top / area), float(np.mean([c.mean() for c in corners]))


def _classify_shape(features: tuple[float, float, float]) -> str | None:
    distances = {name: float(np.linalg.norm(np.subtract(features, p))) for name, p in PROTOTYPES.items()}
    name = min(distances, key=distances.get)
    return name if distances[name] <= MAX_SHAPE_DISTANCE else None


def _position(cx: float, cy: float) -> str:
    """Bounding-box center (fractions of the side, 0.5 = middle) -> position name."""
    if max(abs(cx - 0.5), abs(cy - 0.5)) < CENTER_BOX:
        return "center"
    return ("top " if cy < 0.5 else "bottom ") + ("left" if cx < 0.5 else "right")


def estimate(image: np.ndarray) -> dict:
    """What one image shows: {background, color, shape, position, size} (None where undetermined), plus the
    measurements behind them (background_rgb, color_rgb, area as a fraction of the image, features)."""
    rgb = _as_rgb255(image)  # (H, W, 3)
    height, width = rgb.shape[:2]
    result: dict = dict.fromkeys(ATTRIBUTES) | {"background_rgb": None, "color_rgb": None, "area": 0.0}
    border = _border_pixels(rgb)
    background = np.median(border, axis=0)
    if np.median(np.linalg.norm(border - background, axis=1)) > BORDER_SPREAD:
        return result
    result |= {"background": nearest_color(background), "background_rgb": background.round(1).tolist()}

    mask = _largest_component(np.linalg.norm(rgb - background, axis=2) > MASK_DISTANCE)
    area = float(mask.mean())
    result["area"] = round(area, 4)
    if area < MIN_AREA:
        return result
    inner = _erode(mask)
    color = np.median(rgb[inner if inner.sum() >= 10 else mask], axis=0)
    mask = _refine(rgb, mask, background, color)
    features = shape_features(mask)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2 / width, (ys.min() + ys.max() + 1) / 2 / height
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / max(height, width)
    return result | {
        "color": nearest_color(color),
        "color_rgb": color.round(1).tolist(),
        "shape": _classify_shape(features),
        "features": [round(f, 3) for f in features],
        "position": _position(cx, cy),
        "size": "large" if extent > LARGE_EXTENT else "small",
    }


def score(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> dict:
    """Accuracy of `images` ([N,H,W,3] or a list of [H,W,3]) against their demo `captions`.

    Returns {"n", "accuracy": {attribute: fraction correct among captions naming it, "all": every named attribute
    right}, "per_image": [{"caption", "estimate", "correct"}]}. An attribute no caption names has accuracy None.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    per_image = []
    for image, caption in zip(images, captions, strict=True):
        expected = parse_caption(caption)
        found = estimate(image)
        correct = {a: found[a] == expected[a] for a in ATTRIBUTES if expected[a] is not None}
        per_image.append({"caption": caption, "estimate": found, "correct": correct})
    accuracy = {}
    for attribute in ATTRIBUTES:
        marks = [p["correct"][attribute] for p in per_image if attribute in p["correct"]]
        accuracy[attribute] = float(np.mean(marks)) if marks else None
    accuracy["all"] = float(np.mean([all(p["correct"].values()) for p in per_image])) if per_image else None
    return {"n": len(per_image), "accuracy": accuracy, "per_image": per_image}


def background_share(images: Sequence[np.ndarray] | np.ndarray, rgb: Sequence[float]) -> float:
    """Share of `images` whose background is nearer `rgb` (0–255) than any named color: how often an edit that
    paints a color the captions never name (the demo LoRA's pink background) took effect."""
    target = np.asarray(rgb, dtype=np.float64)
    hits = 0
    for image in images:
        found = estimate(image)["background_rgb"]
        if found is not None:
            found = np.asarray(found)
            hits += bool(np.linalg.norm(found - target) < np.linalg.norm(_PALETTE - found, axis=1).min())
    return hits / len(images) if len(images) else 0.0
