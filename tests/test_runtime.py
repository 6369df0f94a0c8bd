"""mpad.deploy.runtime.OnnxScorer on a hand-built graph: denormal numbers flushed to zero during a call, and
only during it. Each case runs in a fresh interpreter: onnxruntime also sets the flags, for good, on the thread
that makes the process's first session, and that is one of the cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

CHECK = """
import json
import sys
import numpy as np
import torch
from mpad.deploy.runtime import OnnxScorer

tiny = np.float32(2.0**-126)  # the smallest normal float32: half of it is a denormal number
def halved_here():  # computed by numpy on this thread: 0 when this thread flushes denormals
    return float(np.multiply(np.array([tiny]), np.float32(0.5)).astype(np.float32)[0])

if not torch.set_flush_denormal(True):
    print("no flags"); sys.exit(0)
torch.set_flush_denormal(False)
before = halved_here()
scorer = OnnxScorer(sys.argv[1], "cpu", int(sys.argv[2]))  # the process's first session
made = halved_here()
images = torch.full((3, 3, 4, 4), float(tiny))
images[1] = 1.0
maps, scores = scorer(images)
print(json.dumps([before, made, maps[0].abs().max().item(), maps[1].min().item(), scores.tolist(), halved_here()]))
"""


def halving_model(path: Path) -> Path:
    """images (B, 3, 4, 4) -> maps = images[:, 0] / 2 (B, 4, 4), scores = each map's max (B,)."""
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 4, 4])
    maps = helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["batch", 4, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch"])
    nodes = [
        helper.make_node("Constant", [], ["half"], value=helper.make_tensor("h", TensorProto.FLOAT, [], [0.5])),
        helper.make_node("Constant", [], ["first"], value=helper.make_tensor("i", TensorProto.INT64, [], [0])),
        helper.make_node("Mul", ["images", "half"], ["halved"]),
        helper.make_node("Gather", ["halved", "first"], ["maps"], axis=1),
        helper.make_node("ReduceMax", ["maps"], ["scores"], axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "halving", [images], [maps, scores])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("threads", [1, 2])
def test_denormals_are_flushed_during_a_call_and_only_then(tmp_path: Path, threads: int) -> None:
    model = halving_model(tmp_path / "halving.onnx")
    run = subprocess.run([sys.executable, "-c", CHECK, str(model), str(threads)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    if run.stdout.strip() == "no flags":  # x86 with SSE3 (every machine here) has them
        pytest.skip("this CPU cannot flush denormal numbers")
    before, made, flushed, normal, scores, after = json.loads(run.stdout)
    denormal = 2.0**-127
    assert before == denormal  # the thread keeps denormals, as a thread starts
    assert made == denormal  # ... after making the process's first session
    assert flushed == 0.0 and normal == 0.5 and scores == [0.0, 0.5, 0.0]  # flushed during the call only
    assert after == denormal  # ... and kept again after it
