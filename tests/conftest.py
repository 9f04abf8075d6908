import shutil

import pytest

from diffkiln.exporter import export, open_source
from diffkiln.exporter.sources import save_as_folder


def _quiet(_msg):
    pass


@pytest.fixture(scope="session")
def tiny_kiln(tmp_path_factory):
    out = tmp_path_factory.mktemp("kilns") / "tiny"
    export(open_source("tiny"), out, log=_quiet)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_kiln(tmp_path_factory):
    out = tmp_path_factory.mktemp("kilns") / "tiny-sdxl"
    export(open_source("tiny-sdxl"), out, log=_quiet)
    return out


@pytest.fixture(scope="session")
def demo_kiln(tmp_path_factory):
    """The trained demo model shipped in diffkiln/assets/demo, exported (seconds)."""
    out = tmp_path_factory.mktemp("kilns") / "demo"
    export(open_source("demo"), out, log=_quiet)
    return out


@pytest.fixture(scope="session")
def sd15_kiln(tmp_path_factory):
    """The real SD1.5 architecture exported once per session (slow: ~2 minutes, ~4.5 GB RSS)."""
    out = tmp_path_factory.mktemp("kilns") / "sd15"
    export(open_source("sd15"), out, log=_quiet)
    return out


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny preset saved as a standard diffusers folder."""
    return save_as_folder(open_source("tiny"), tmp_path_factory.mktemp("folders") / "tiny")


@pytest.fixture
def folder_copy(tiny_folder, tmp_path):
    """A private copy of the tiny diffusers folder that a test may damage."""
    return shutil.copytree(tiny_folder, tmp_path / "model")


def _has_gpu() -> bool:
    import shutil as _shutil
    import subprocess

    if not _shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run wherever an NVIDIA GPU is present and are skipped (with the reason) elsewhere."""
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
