"""The demo model's synthetic data: deterministic, captions in one grammar, and a held-out split that tests
composition (its (shape, color, background) triples never occur in training, their pairs all do)."""

import itertools
import subprocess
import sys

import numpy as np
import pytest

from diffkiln.demo.data import (
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    caption_of,
    heldout_captions,
    heldout_scenes,
    heldout_triples,
    make_dataset,
    parse_caption,
    render,
    sample_scenes,
)


def test_same_seed_same_data_other_seed_other_data():
    images, captions, scenes = make_dataset(40, seed=3)
    again = make_dataset(40, seed=3)
    assert images.shape == (40, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again[0]) and captions == again[1] and scenes == again[2]
    other_images, other_captions, _ = make_dataset(40, seed=4)
    assert not np.array_equal(images, other_images) and captions != other_captions


def test_captions_parse_back_to_their_scene():
    _, captions, scenes = make_dataset(300, seed=0)
    omitted = 0
    for caption, scene in zip(captions, scenes, strict=True):
        parsed = parse_caption(caption)
        for attribute, value in parsed.items():
            assert value in (None, getattr(scene, attribute)), caption
        assert parsed["shape"] == scene.shape and parsed["color"] == scene.color  # never left out
        omitted += None in parsed.values()
    assert 0.2 < omitted / len(captions) < 0.5  # some captions leave size, background or position out


def test_caption_grammar():
    scene = Scene("circle", "red", "blue", "top left", "small")
    assert caption_of(scene) == "a small red circle on a blue background, top left"
    assert caption_of(scene, frozenset({"size", "background", "position"})) == "a red circle"
    assert parse_caption("A  Large green DIAMOND, center") == {
        "size": "large",
        "color": "green",
        "shape": "diamond",
        "background": None,
        "position": "center",
    }
    for bad in ("a red blob", "a pink circle", "red circle on a blue background", "a red circle on blue"):
        with pytest.raises(ValueError, match="not a demo caption"):
            parse_caption(bad)


def test_heldout_captions_are_fixed_full_and_balanced():
    captions = heldout_captions()
    assert captions == heldout_captions() and len(set(captions)) == 64
    parsed = [parse_caption(c) for c in captions]
    assert all(None not in p.values() for p in parsed)
    for attribute, names in (("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        counts = [sum(p[attribute] == n for p in parsed) for n in names]
        assert min(counts) >= 64 // len(names) - 2, (attribute, counts)


def test_heldout_combinations_are_new_but_their_parts_are_not():
    held = heldout_triples()
    assert {s.triple for s in heldout_scenes()} == held and len(held) == 32
    train = {s.triple for s in sample_scenes(20000, np.random.default_rng(0))}
    assert not train & held
    assert len(train) == 4 * 8 * 7 - 32  # every other combination does occur
    for shape, color, background in held:
        assert any(t[:2] == (shape, color) for t in train)
        assert any(t[1:] == (color, background) for t in train)
        assert any(t[::2] == (shape, background) for t in train)


def test_render_without_jitter_is_exact():
    image = render(Scene("square", "yellow", "black", "center", "large"))
    assert tuple(image[32, 32]) == COLORS["yellow"] and tuple(image[0, 0]) == COLORS["black"]
    for shape, position in itertools.product(SHAPES, POSITIONS):  # every shape stays inside the frame
        image = render(Scene(shape, "white", "black", position, "large"), np.random.default_rng(1))
        frame = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert frame.max() < 60, (shape, position)


def test_demo_and_eval_import_without_torch():
    code = "import sys, diffkiln.demo, diffkiln.eval; print([m for m in ('torch', 'diffusers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
