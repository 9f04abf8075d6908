"""Seeded fuzzing of the readers that take other people's files: random truncations and bit flips of real
safetensors LoRAs, manifests and ONNX graphs must give a one-line DiffkilnError or a valid result, never
another exception."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffkiln import kiln
from diffkiln.errors import DiffkilnError
from diffkiln.kiln_reader import external_locations
from diffkiln.lora.tensorfile import TensorFile

CASES = 150


def mutations(data: bytes, seed: int):
    """CASES damaged copies of `data`: half truncations, half 1–8 flipped bits (seeded)."""
    rng = np.random.default_rng(seed)
    for i in range(CASES):
        if i % 2 == 0:
            yield data[: int(rng.integers(0, len(data)))]
        else:
            damaged = bytearray(data)
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
                damaged[pos] ^= 1 << int(rng.integers(0, 8))
            yield bytes(damaged)


def one_line(e: DiffkilnError) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


def test_safetensors_reader(tmp_path):
    src = Path(__file__).resolve().parents[1] / "diffkiln" / "assets" / "demo_lora.safetensors"
    data = src.read_bytes()
    path = tmp_path / "l.safetensors"
    outcomes = {"ok": 0, "refused": 0}
    for damaged in mutations(data, seed=0):
        path.write_bytes(damaged)
        try:
            f = TensorFile(path)
            for key in f.keys():  # noqa: SIM118 (TensorFile is not iterable)
                f.get(key)
            outcomes["ok"] += 1
        except DiffkilnError as e:
            one_line(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] >= CASES // 2  # every truncation is caught, at least


@pytest.mark.parametrize("target", [kiln.MANIFEST, "unet/model.onnx"])
def test_manifest_and_graph_readers(tiny_kiln, tmp_path, target):
    k = shutil.copytree(tiny_kiln, tmp_path / "k")
    data = (tiny_kiln / target).read_bytes()
    refused = 0
    for damaged in mutations(data, seed=1):
        (k / target).write_bytes(damaged)
        try:
            if target == kiln.MANIFEST:
                kiln.read_manifest(k)
            else:
                external_locations(k / target)
        except DiffkilnError as e:
            one_line(e)
            refused += 1
    assert refused >= CASES // 3


@pytest.mark.parametrize("target", ["model_index.json", "unet/config.json", "text_encoder/model.onnx"])
def test_optimum_folder_reader(tiny_kiln, tmp_path, target):
    """An optimum folder's manifest is made from its index, configs and graphs' I/O (read from the wire format)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fixture", Path(__file__).parents[1] / "tools/make_optimum_fixture.py"
    )
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    folder = fixture.convert(tiny_kiln, tmp_path / "optimum")
    data = (folder / target).read_bytes()
    refused = 0
    for damaged in mutations(data, seed=2):
        (folder / target).write_bytes(damaged)
        try:
            kiln.read_manifest(folder)
        except DiffkilnError as e:
            one_line(e)
            refused += 1
    assert refused >= CASES // 3
