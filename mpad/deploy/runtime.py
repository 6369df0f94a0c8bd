"""An exported model on ONNX Runtime: the scorer `mpad predict --backend onnx` and `mpad serve` use. Imports
neither open_clip nor the model code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpad.deploy.sidecar import DeployFileError

INPUT_NAME = "images"
OUTPUT_NAMES = ("maps", "scores")
# onnxruntime's graph rewrites left out: NCHWc blocking pads the Gaussian blur's one-channel convolutions to the
# CPU's block of 8 or 16 channels (that much more work, plus reorders), about 8 % of mpad-tiny's time an image.
DISABLED_OPTIMIZERS = ["NchwcTransformer"]


@contextmanager
def flushed_denormals() -> Iterator[None]:
    """Float results below 2**-126 read and written as zero on the calling thread (the CPU's FTZ/DAZ flags), then
    the flags cleared again (a thread starts with them clear). Why: LAA's locality mask (eq. 12) puts -inf
    into the V-V attention's softmax, and onnxruntime's exp turns each masked entry into a denormal number,
    which the CPU computes some 100x slower: mpad-tiny's two masked softmaxes took 10x the time of its others,
    and flushed, the model takes 10-15 % less time an image. A flushed value is below 1.2e-38 (in the softmax,
    a share of a sum of at least 1); the exported models measured gave the same outputs bit for bit."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class OnnxScorer:
    """Scores image batches with an exported model on ONNX Runtime (the optional extra `export`).

    device: "cpu", "auto" (CUDA when onnxruntime has it, else CPU) or "cuda"/"cuda:N".
    threads: intra-op threads (None: onnxruntime's default, one per physical core).
    spinning: whether idle intra-op threads spin-wait for the next call (onnxruntime's default: the fastest
    alone, but spinning threads take the cores from the process's other threads, such as a server's decoding).
    Denormal numbers are flushed to zero, on onnxruntime's threads and on the caller's during a call
    (`flushed_denormals` says why).
    """

    def __init__(
        self, model: str | Path, device: str = "cpu", threads: int | None = None, spinning: bool = True
    ) -> None:
        try:
            import onnxruntime as ort  # optional: `pip install -e '.[export]'`
        except ImportError as err:
            raise DeployFileError("the onnx backend needs onnxruntime: pip install -e '.[export]'") from err
        available = ort.get_available_providers()
        wants_gpu = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise DeployFileError(f"--device {device}: this onnxruntime has no CUDA provider ({', '.join(available)})")
        providers: list[Any] = ["CPUExecutionProvider"]
        if wants_gpu:
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        try:
            options = ort.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = threads
            if not spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # on its own threads; and, onnxruntime's call_once, on the thread that makes the process's first
            # session, for good: made inside flushed_denormals, so that this thread's flags are clear again after
            options.add_session_config_entry("session.set_denormal_as_zero", "1")
            with flushed_denormals():
                self.session = ort.InferenceSession(
                    str(model), options, providers=providers, disabled_optimizers=DISABLED_OPTIMIZERS
                )
        except Exception as err:  # onnxruntime raises its own exception types for a bad file
            raise DeployFileError(f"{model}: onnxruntime cannot load it ({err})") from err

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) float in [0, 1] at the model's input size -> (maps (B, R, R), scores (B,)), CPU."""
        feed = {INPUT_NAME: np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)}
        with flushed_denormals():
            maps, scores = self.session.run(list(OUTPUT_NAMES), feed)
        return torch.from_numpy(maps), torch.from_numpy(scores)
