"""The one harness every benchmark under bench/ shares: alternating rounds, medians, min-max ratios, a summary line.

Two arms of a comparison run in the same process (or at least the same run), one after the other in every
round, the order rotated each round, so that both see the same machine state; a ratio is then taken per round
and reported as its median and its min-max over rounds. The last line a benchmark prints is `summary(...)`,
which docs/benchmarks.md quotes:

    SUMMARY encoder: dual/plain time 0.99x (0.97-1.02x, 3 rounds), ViT-B-16-plus-240

    from harness import alternate, ratio, summary
    times = alternate(3, {"plain": lambda: model(x), "dual": lambda: encoder(x)})
    summary("encoder", f"dual/plain time {ratio(times['dual'], times['plain'])}")
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


def alternate(
    rounds: int, arms: Mapping[str, Callable[[], float | None]], warmup: bool = True
) -> dict[str, list[float]]:
    """Run every arm once a round for `rounds` rounds, the order rotated by one each round; {arm: [one figure per
    round]}. An arm's figure is what it returns, or its wall time in seconds when it returns None. With `warmup`,
    each arm runs once first, untimed (imports, caches, allocator)."""
    names = list(arms)
    if warmup:
        for name in names:
            arms[name]()
    figures: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            value = arms[name]()
            figures[name].append(time.perf_counter() - start if value is None else float(value))
    return figures


def repeat(seconds: float, fn: Callable[..., object], *args: object) -> Callable[[], float]:
    """An arm that calls fn(*args) as many times as fill about `seconds` (from the time of one call, made here)
    and returns the mean seconds a call: calls of a few ms are too short to time one by one."""
    start = time.perf_counter()
    fn(*args)
    calls = max(1, round(seconds / (time.perf_counter() - start)))

    def arm() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        return (time.perf_counter() - start) / calls

    return arm


@dataclass(frozen=True)
class Ratio:
    """The per-round ratios a / b of two arms: their median, lowest and highest."""

    median: float
    low: float
    high: float
    rounds: int

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f}x, {self.rounds} rounds)"


def ratio(a: Sequence[float], b: Sequence[float]) -> Ratio:
    """a[i] / b[i] over the rounds of `alternate` (same length): median, min and max."""
    if len(a) != len(b) or not a:
        raise ValueError(f"ratio needs two equal, non-empty series, got {len(a)} and {len(b)}")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def summary(name: str, *figures: str) -> None:
    """The benchmark's closing line, `SUMMARY <name>: <figure>, <figure>, ...`, the one docs/benchmarks.md quotes."""
    print(f"SUMMARY {name}: {', '.join(figures)}", flush=True)
