"""A prompts file's detector as one ONNX model (`mpad export`), for inference without the training stack.

The graph is `Detector.score` after the LAA encoder, traced by torch.onnx (TorchScript exporter, opset
OPSET): images (N, 3, H, W) float in [0, 1] at the backbone's input size -> clamp to [0, 1] and normalise
with the backbone's mean / std (in the graph) -> encoder -> text maps -> memory fusion -> Gaussian blur ->
image score. The text embeddings, the LAA mask, the memory banks and the scoring settings are constants.
Outputs: maps (N, R, R) at the evaluation resolution R, scores (N,), declared so in the graph (R fixed, the
batch size N dynamic). The caller
resizes (mpad.features.stack_images: bicubic, antialiased, whole image, no crop) and nothing else.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from mpad.deploy.runtime import INPUT_NAME, OUTPUT_NAMES, OnnxScorer
from mpad.detector import Detector
from mpad.io import atomic_path
from mpad.memory import _CHUNK_ELEMENTS
from mpad.transforms import normalise

OPSET = 17  # run by onnxruntime >= 1.14, so by 1.31; scaled_dot_product_attention with a mask exports from 14
MAX_BYTES = 2**31 - 2**26  # one protobuf file holds < 2 GiB; keep a margin for the graph itself
EXAMPLE_BATCH = 2  # traced with 2 (a batch of 1 could be specialised away), checked with CHECK_BATCH
CHECK_BATCH = 3
TOLERANCE = 1e-4  # max abs difference of maps and scores, onnxruntime vs torch, that export accepts


class ExportError(ValueError):
    """A detector that cannot be exported; the message says why."""


class DetectorGraph(nn.Module):
    """The exported function: images (N, 3, H, W) in [0, 1] at the model's input size -> (maps (N, R, R),
    scores (N,)), with R = `resolution`. Calls the Detector's own code: one implementation of the maths."""

    def __init__(self, detector: Detector, resolution: int) -> None:
        super().__init__()
        self.detector = detector
        self.encoder = detector.encoder  # a submodule, so that its weights and mask are part of the graph
        self.size = (int(resolution), int(resolution))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bundle = self.detector.bundle
        return self.detector.score(self.encoder(normalise(images, bundle.mean, bundle.std)), self.size)


def check_exportable(detector: Detector) -> None:
    """ExportError when the detector cannot become one ONNX file: half precision, a model over protobuf's 2 GiB,
    or a memory bank too large for the one-block nearest-neighbour search that traces for any batch size."""
    bundle = detector.bundle
    if bundle.precision != "fp32":
        raise ExportError(f"the backbone is loaded in {bundle.precision}; export builds fp32 models only")
    weights = sum(p.numel() * p.element_size() for p in detector.encoder.parameters())
    if weights > MAX_BYTES:
        raise ExportError(
            f"{bundle.name}'s image tower has {weights / 2**30:.1f} GiB of weights; one ONNX file holds less than 2 GiB"
        )
    if detector.memory is not None:
        patches = EXAMPLE_BATCH * detector.encoder.grid[0] * detector.encoder.grid[1]
        largest = max(bank.shape[0] for bank in detector.memory.banks)
        if patches * largest > _CHUNK_ELEMENTS:
            raise ExportError(
                f"its memory bank of {largest} patches is too large to export (at most "
                f"{_CHUNK_ELEMENTS // patches}: fewer shots)"
            )


def declare_shapes(path: str | Path, size: tuple[int, int], resolution: int) -> None:
    """Declare the graph's input and output shapes as it computes them: images (batch, 3, H, W), maps
    (batch, R, R), scores (batch,). The tracer's shape inference declares maps as ['batch', 'batch',
    'Squeezemaps_dim_2'], which passes onnx.checker but misleads a reader of declared shapes (a server that
    allocates from them). ONNX's strict shape inference then checks the declaration against the graph."""
    import onnx  # the optional extra `export`, like onnxruntime
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    maps, scores = OUTPUT_NAMES
    model = update_inputs_outputs_dims(
        onnx.load(str(path)),
        {INPUT_NAME: ["batch", 3, *size]},
        {maps: ["batch", resolution, resolution], scores: ["batch"]},
    )
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"ONNX's shape inference rejects the declared shapes: {err}") from err
    onnx.save(model, str(path))


@torch.no_grad()
def export_onnx(detector: Detector, resolution: int, out: str | Path) -> float:
    """Write the detector's graph (see module docstring) to `out` atomically, then run it on onnxruntime
    with another batch size than traced; returns the max abs difference to torch's maps and scores.
    ExportError when it cannot be exported or onnxruntime disagrees by more than TOLERANCE."""
    check_exportable(detector)
    graph = DetectorGraph(detector, resolution).eval()
    size = detector.bundle.image_size
    example = torch.rand(EXAMPLE_BATCH, 3, *size, generator=torch.Generator().manual_seed(0))
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with atomic_path(out) as tmp:
        fastpath = torch.backends.mha.get_fastpath_enabled()
        # nn.MultiheadAttention's fused inference kernel has no ONNX form: trace its plain ops.
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about Python ints: the shapes they fix are constant
                torch.onnx.export(
                    graph,
                    (example,),
                    str(tmp),
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes=dynamic,
                    opset_version=OPSET,
                    dynamo=False,
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        declare_shapes(tmp, size, resolution)
        check = torch.rand(CHECK_BATCH, 3, *size, generator=torch.Generator().manual_seed(1))
        got = OnnxScorer(tmp)(check)
        want = graph(check)
        diff = max(float((g - w.cpu()).abs().max()) for g, w in zip(got, want, strict=True))
        if not diff <= TOLERANCE:  # also catches nan
            raise ExportError(f"onnxruntime's maps and scores differ from torch's by {diff:.2g} (> {TOLERANCE:g})")
    return diff
