"""TensorRT optimization profiles from a component's contract (its ComponentSpec as the manifest records it).

A contract names symbolic dims (`batch`, `height`, `width`, `image_height`, …, `sequence`) and a min/opt/max
range for each; a build request narrows them: `--batch MIN:OPT:MAX` (images per prompt), `--height/--width`
in pixels (`MIN:OPT:MAX` or one value), `--static` (min = opt = max: CUDA graphs can be captured). The text
encoders and the UNet run the CFG batch (uncond + cond in one call), so their opt and max batch are doubled; the
min stays, for runs without guidance (g ≤ 1 skips the uncond half). A static profile holds the CFG batch only.
Flux's guidance is distilled (an input, one row per image): its profiles are not doubled (true CFG, 2 rows per
image, fits a dynamic profile whose max allows it). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffkiln.errors import DiffkilnError
from diffkiln.specs import VAE_SCALE

CFG_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")  # they take [uncond; cond] in one batch


def parse_range(text: str | None, what: str) -> tuple[int, int, int] | None:
    """`"1:2:4"` → (1, 2, 4); `"2"` → (2, 2, 2); None stays None. Refuses what is not min ≤ opt ≤ max > 0."""
    if text is None:
        return None
    parts = str(text).split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise DiffkilnError(f"{what} must be N or MIN:OPT:MAX (integers), not {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not 0 < values[0] <= values[1] <= values[2]:
        raise DiffkilnError(f"{what} must be N or MIN:OPT:MAX with 0 < MIN ≤ OPT ≤ MAX, not {text!r}")
    return tuple(values)


@dataclass(frozen=True)
class ShapeRequest:
    """What `diffkiln build` asks for; None keeps the contract's own range. Sizes are in pixels."""

    batch: tuple[int, int, int] | None = None
    height: tuple[int, int, int] | None = None
    width: tuple[int, int, int] | None = None
    static: bool = False


def dim_ranges(
    component: str, contract_profile: dict, request: ShapeRequest, cfg: bool = True
) -> dict[str, tuple[int, int, int]]:
    """{symbol: (min, opt, max)} for every symbolic dim of one component."""
    ranges = {k: tuple(v) for k, v in contract_profile.items()}
    if request.batch:
        ranges["batch"] = request.batch
    for side, pixels in (("height", request.height), ("width", request.width)):
        if pixels is None:
            continue
        if any(p % VAE_SCALE for p in pixels):
            raise DiffkilnError(f"--{side} must be multiples of {VAE_SCALE} pixels, not {':'.join(map(str, pixels))}")
        ranges[side] = tuple(p // VAE_SCALE for p in pixels)
    if cfg and component in CFG_COMPONENTS and "batch" in ranges:
        low, opt, high = ranges["batch"]
        ranges["batch"] = (low, 2 * opt, 2 * high)
    if request.static:
        ranges = {k: (v[1], v[1], v[1]) for k, v in ranges.items()}
    for side in ("height", "width"):
        if side in ranges:
            ranges[f"image_{side}"] = tuple(VAE_SCALE * v for v in ranges[side])
    if "height" in ranges and "width" in ranges:  # Flux's packed latents: one token per 2×2 latent patch
        ranges["image_tokens"] = tuple(
            (h // 2) * (w // 2) for h, w in zip(ranges["height"], ranges["width"], strict=True)
        )
    return ranges


def input_profiles(
    component: str, contract: dict, request: ShapeRequest, cfg: bool = True
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input name: (min shape, opt shape, max shape)} for one component, the form TensorRT's
    `IOptimizationProfile.set_shape` takes. Fixed dims stay fixed; a symbol without a range is refused."""
    ranges = dim_ranges(component, contract.get("profile", {}), request, cfg)
    profiles = {}
    for tensor in contract.get("inputs", []):
        shapes = [[], [], []]
        for dim in tensor["shape"]:
            if isinstance(dim, int):
                values = (dim, dim, dim)
            elif dim in ranges:
                values = ranges[dim]
            else:
                raise DiffkilnError(f"{component} input {tensor['name']}: no profile range for dim {dim!r}")
            for shape, value in zip(shapes, values, strict=True):
                shape.append(value)
        profiles[tensor["name"]] = tuple(tuple(s) for s in shapes)
    return profiles


def is_static(profiles: dict) -> bool:
    """True when every input has min = opt = max (CUDA-graph capture is possible)."""
    return all(low == opt == high for low, opt, high in profiles.values())
