"""Shared fixtures: the tiny random-weight CLIP is built once per test session."""

from __future__ import annotations

import pytest

from mpad.clip import ClipBundle, load_clip


@pytest.fixture(scope="session")
def tiny_clip() -> ClipBundle:
    return load_clip("mpad-tiny", "none", device="cpu")
