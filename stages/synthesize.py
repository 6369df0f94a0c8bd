"""Stage `synthesize`: not implemented yet."""

from __future__ import annotations

from stages.common import fail


def main() -> None:
    """Not implemented yet."""
    fail("stage 'synthesize' is not implemented yet")
