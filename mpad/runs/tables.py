"""What the sweep's and the ablations' tables share: mean ± sample standard deviation, and padded columns."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1: the seeds are a sample of the possible ones) of one or more
    values; None for the deviation of a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def mean_std_text(mean: float, std: float | None, sep: str = " ± ") -> str:
    """`86.54 ± 1.00` (two decimals, percent), or only the mean without a deviation."""
    return f"{mean:.2f}" + ("" if std is None else f"{sep}{std:.2f}")


def widths(table: Sequence[Sequence[str]]) -> list[int]:
    """Each column's width: its longest cell."""
    return [max(len(row[i]) for row in table) for i in range(len(table[0]))]


def padded(row: Sequence[str], column_widths: Sequence[int], right_from: int) -> list[str]:
    """The row's cells padded to the widths: text left-aligned, the columns from `right_from` on (numbers) right."""
    cells = enumerate(zip(row, column_widths, strict=True))
    return [c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in cells]
