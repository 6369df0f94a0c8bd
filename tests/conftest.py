"""Shared fixtures: the tiny random-weight CLIP is built once per test session; the prompt-ensemble cache of the
stages goes to a temporary folder, not to the user's ~/.cache."""

from __future__ import annotations

import os

import pytest

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


@pytest.fixture(scope="session")
def tiny_clip() -> ClipBundle:
    return load_clip("mpad-tiny", "none", device="cpu")
