"""Benchmark pixel-level AUROC, AP and AUPRO on a synthetic MVTec-sized category.

200 float32 maps of 256x256 (13M pixels) with a few blob masks per anomalous image. Prints wall time and
peak memory per metric, and the time ratio against sklearn's roc_auc_score on the same pixels.
Each metric runs in a fresh process; peak memory is reported by tracemalloc (numpy allocations only)
and as the growth of the process's max RSS during the call (numpy and torch).

Run: .venv/bin/python bench/metrics.py [n_maps]
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable

import numpy as np


def make_data(n: int = 200, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(maps float32 (n, size, size), masks bool): half the images carry 1-3 elliptic blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(20, size - 20, size=2)
            ry, rx = rng.uniform(3, 25, size=2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps = rng.random(masks.shape, dtype=np.float32)
    maps += 0.7 * masks
    return maps, masks


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _metric(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    from sklearn.metrics import roc_auc_score

    from mpad.metrics import aupro, auroc, average_precision

    return {
        "auroc": auroc,
        "ap": average_precision,
        "aupro": aupro,
        "sklearn_auroc": lambda s, y: roc_auc_score(y.ravel(), s.ravel()),
    }[name]


def run_one(name: str, n: int) -> None:
    """Child process: time one metric; peak memory = max RSS growth over the call (numpy and torch)."""
    fn = _metric(name)
    maps, masks = make_data(n)
    tracemalloc.start()
    rss0 = _maxrss_mib()
    t0 = time.perf_counter()
    value = fn(maps, masks)
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    print(f"{value} {dt} {peak / 2**20} {_maxrss_mib() - rss0}")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    print(f"{n} maps of 256x256 = {n * 256 * 256 / 1e6:.1f}M pixels (float32), 1-3 blobs in half the masks")
    print("peak memory above the data: tracemalloc (numpy only) and max-RSS growth (numpy + torch)")
    times = {}
    for name in ("auroc", "ap", "aupro", "sklearn_auroc"):
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, str(n)], capture_output=True, text=True, check=True
        ).stdout.split()
        value, dt, traced, rss = map(float, out[-4:])
        times[name] = dt
        print(
            f"{name:<14} value={value:.6f}  time={dt:6.2f} s  "
            f"peak tracemalloc={traced:6.0f} MiB  max-RSS growth={rss:6.0f} MiB"
        )
    print(f"sklearn roc_auc_score time / mpad auroc time: {times['sklearn_auroc'] / times['auroc']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        run_one(sys.argv[2], int(sys.argv[3]))
    else:
        main()
