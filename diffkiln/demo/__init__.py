"""diffkiln's demo model: synthetic captioned shapes (`data`) and, in `diffkiln/assets/demo`, the model trained on them.

numpy + Pillow only, like the runtime: the demo data and its evaluator run without torch.
"""

from diffkiln.demo.data import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    caption_of,
    heldout_captions,
    heldout_scenes,
    make_dataset,
    parse_caption,
    render,
)

__all__ = [
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "caption_of",
    "heldout_captions",
    "heldout_scenes",
    "make_dataset",
    "parse_caption",
    "render",
]
