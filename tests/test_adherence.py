"""The prompt-adherence evaluator: right on clean and mildly degraded drawings with known answers, and wrong where
the image does not show the caption (wrong color or shape, blank, noise)."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffkiln.demo.data import (
    COLORS,
    LORA_BACKGROUND,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    caption_of,
    heldout_scenes,
    render,
)
from diffkiln.eval import ATTRIBUTES, background_share, estimate, score

ALL_SCENES = [
    Scene(*combo) for combo in itertools.product(SHAPES, COLORS, COLORS, POSITIONS, SIZES) if combo[1] != combo[2]
]


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A little blur and noise: roughly how a decoded latent differs from a clean drawing."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)


def test_every_attribute_combination_drawn_clean_scores_right():
    rng = np.random.default_rng(0)
    assert len(ALL_SCENES) == 4 * 8 * 7 * 5 * 2
    result = score([render(s, rng) for s in ALL_SCENES], [caption_of(s) for s in ALL_SCENES])
    assert result["n"] == len(ALL_SCENES)
    for attribute in (*ATTRIBUTES, "all"):
        assert result["accuracy"][attribute] >= 0.98, (attribute, result["accuracy"])


def test_blurred_noisy_drawings_still_score_right():
    rng = np.random.default_rng(1)
    scenes = ALL_SCENES[::5]
    result = score([_degrade(render(s, rng), rng) for s in scenes], [caption_of(s) for s in scenes])
    for attribute in ATTRIBUTES:
        assert result["accuracy"][attribute] >= 0.97, (attribute, result["accuracy"])


def test_float_images_score_like_uint8():
    scene = heldout_scenes()[0]
    image = render(scene, np.random.default_rng(2))
    as_uint8, as_float = estimate(image), estimate(image.astype(np.float32) / 255)
    assert {a: as_uint8[a] for a in ATTRIBUTES} == {a: as_float[a] for a in ATTRIBUTES}
    assert {a: as_uint8[a] for a in ATTRIBUTES} == {a: getattr(scene, a) for a in ATTRIBUTES}


def test_wrong_color_and_shape_score_wrong():
    image = render(Scene("square", "blue", "yellow", "top left", "large"))
    result = score([image], ["a large red circle on a yellow background, top left"])
    correct = result["per_image"][0]["correct"]
    assert correct == {"color": False, "background": True, "shape": False, "position": True, "size": True}
    assert result["accuracy"]["all"] == 0.0


@pytest.mark.parametrize(("drawn", "claimed"), list(itertools.permutations(SHAPES, 2)))
def test_every_other_shape_scores_wrong(drawn, claimed):
    image = render(Scene(drawn, "white", "black", "center", "large"))
    assert not score([image], [f"a white {claimed} on a black background"])["per_image"][0]["correct"]["shape"]


def test_blank_image_shows_no_shape():
    blank = np.full((64, 64, 3), COLORS["blue"], dtype=np.uint8)
    found = estimate(blank)
    assert found["background"] == "blue"
    assert found["color"] is found["shape"] is found["position"] is found["size"] is None
    correct = score([blank], ["a small red circle on a blue background, center"])["per_image"][0]["correct"]
    assert correct == {"color": False, "background": True, "shape": False, "position": False, "size": False}


def test_noise_scores_wrong_everywhere():
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8)
    result = score(noise, ["a small red circle on a blue background, center"] * 8)
    assert all(value == 0.0 for value in result["accuracy"].values())
    assert estimate(noise[0])["background"] is None


def test_background_share_counts_only_backgrounds_nearer_the_color_than_any_named_one():
    rng = np.random.default_rng(5)
    scenes = heldout_scenes()[:6]
    pink = [render(s, rng, rgb=(COLORS[s.color], LORA_BACKGROUND)) for s in scenes[:4]]
    named = [render(s, rng) for s in scenes[4:]]
    noise = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)  # no uniform background: not counted
    magenta_ish = np.full((64, 64, 3), (200, 60, 190), dtype=np.uint8)  # nearer the named purple than pink
    assert background_share(pink, LORA_BACKGROUND) == 1.0
    assert background_share([*pink, *named, *noise, magenta_ish], LORA_BACKGROUND) == 4 / 9
    assert background_share(named, LORA_BACKGROUND) == 0.0


def test_only_named_attributes_are_scored():
    image = render(Scene("circle", "red", "blue", "center", "small"))
    result = score([image, image], ["a red circle", "a small red circle, center"])
    assert result["accuracy"]["background"] is None
    assert result["accuracy"]["size"] == result["accuracy"]["all"] == 1.0
    assert set(result["per_image"][0]["correct"]) == {"color", "shape"}


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        score(np.zeros((2, 64, 64, 3), np.uint8), ["a red circle"])


def test_bench_adherence_scores_only_captions_the_evaluator_reads():
    """`diffkiln bench --prompts` with a user's own prompts: unreadable captions are left out, never a traceback."""
    from diffkiln.bench.fidelity import adherence

    black = np.zeros((2, 64, 64, 3))
    assert set(adherence(black[:1], ["a photo of a cat"]).values()) == {None}
    mixed = adherence(black, ["a photo of a cat", "a red circle on a white background"])
    assert mixed["color"] == 0.0 and mixed["position"] is None
