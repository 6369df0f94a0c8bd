"""Stage `train`: not implemented yet."""

from __future__ import annotations

from stages.common import fail


def main() -> None:
    """Not implemented yet."""
    fail("stage 'train' is not implemented yet")
