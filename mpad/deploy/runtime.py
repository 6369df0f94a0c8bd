"""An exported model on ONNX Runtime: the scorer `mpad predict --backend onnx` and `mpad serve` use. Imports
neither open_clip nor the model code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpad.deploy.sidecar import DeployFileError

INPUT_NAME = "images"
OUTPUT_NAMES = ("maps", "scores")


class OnnxScorer:
    """Scores image batches with an exported model on ONNX Runtime (the optional extra `export`).

    device: "cpu", "auto" (CUDA when onnxruntime has it, else CPU) or "cuda"/"cuda:N".
    threads: intra-op threads (None: onnxruntime's default, one per physical core).
    spinning: whether idle intra-op threads spin-wait for the next call (onnxruntime's default: the fastest
    alone, but spinning threads take the cores from the process's other threads, such as a server's decoding).
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
            self.session = ort.InferenceSession(str(model), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for a bad file
            raise DeployFileError(f"{model}: onnxruntime cannot load it ({err})") from err

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) float in [0, 1] at the model's input size -> (maps (B, R, R), scores (B,)), CPU."""
        feed = {INPUT_NAME: np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)}
        maps, scores = self.session.run(list(OUTPUT_NAMES), feed)
        return torch.from_numpy(maps), torch.from_numpy(scores)
