"""Stage `fetch`: not implemented yet."""

from __future__ import annotations

from stages.common import fail


def main() -> None:
    """Not implemented yet."""
    fail("stage 'fetch' is not implemented yet")
