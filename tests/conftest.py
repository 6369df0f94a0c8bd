"""Shared fixtures: the tiny random-weight CLIP is built once per test session; the prompt-ensemble cache of the
stages goes to a temporary folder, not to the user's ~/.cache; tests marked `cuda` are skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from mpad.clip import ClipBundle, load_clip


@pytest.fixture(scope="session", autouse=True)
def _text_cache_dir(tmp_path_factory):
    saved = os.environ.get("MPAD_CACHE_DIR")
    os.environ["MPAD_CACHE_DIR"] = str(tmp_path_factory.mktemp("mpad-cache"))
    yield
    if saved is None:
        os.environ.pop("MPAD_CACHE_DIR", None)
    else:
        os.environ["MPAD_CACHE_DIR"] = saved


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped without a CUDA device (unless MPAD_CUDA_TEST_DEVICE names another)."""
    if torch.cuda.is_available() or os.environ.get("MPAD_CUDA_TEST_DEVICE"):
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_clip() -> ClipBundle:
    return load_clip("mpad-tiny", "none", device="cpu")
