"""Shared fixtures: the tiny random-weight CLIP is built once per test session; the prompt-ensemble cache of the
stages goes to a temporary folder, not to the user's ~/.cache; tests marked `cuda` are skipped without CUDA.

One torch thread per process unless OMP_NUM_THREADS says otherwise (set before torch is imported, and inherited
by the stage processes DVC starts): the tiny model's ops are far too small to gain from a second thread, and
spinning OpenMP threads on busy cores made one offline `train` 10x slower (119 s instead of 12 s at load 8 on
2 cores). `make test` runs two pytest workers (pytest-xdist), which fill the 2 cores with one thread each.

ATEN_CPU_CAPABILITY=default or avx2 (another CPU's kernel set, `make test`'s second pass) holds oneDNN to AVX2 as
well, unless ONEDNN_MAX_CPU_ISA says otherwise: on a CPU with AMX or avx512_bf16, torch's bf16 attention packs its
operands for oneDNN's kernels with ATen's avx512 code, which those capabilities leave out ("pack_vnni2 is only
supported when avx512 is supported"); a CPU that really lacks avx512 lacks both.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import pytest  # noqa: E402
import torch  # noqa: E402

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
    """Modules with end-to-end runs (marker `slow`) first, the longest (test_pipeline.py, one DVC chain of minutes)
    first of all: `make test` hands whole modules to its 2 workers in this order, and a long module handed out
    last would keep one worker busy while the other idles. Tests marked `cuda` are skipped without a CUDA device
    (unless MPAD_CUDA_TEST_DEVICE names another)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in slow, item.path.name != "test_pipeline.py"))  # stable
    if torch.cuda.is_available() or os.environ.get("MPAD_CUDA_TEST_DEVICE"):
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty project folder as the working directory: stage commands read ./params.yaml and write ./data."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_clip() -> ClipBundle:
    return load_clip("mpad-tiny", "none", device="cpu")
