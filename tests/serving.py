"""For the serving tests: one tiny exported model per test session, `mpad predict --backend onnx`'s answers
on generated images, and an app run by a real uvicorn on a free loopback port."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from typing import Any

import uvicorn
from tiny_records import tiny_record
from typer.testing import CliRunner

from mpad.clip import ClipBundle
from mpad.data.synthetic import generate
from mpad.serve.connections import server_config
from stages.cli import app as cli

THRESHOLDS = {"category": "disc", "image_score": "topk_mean", "topk": 0.05, "smoothing_sigma": 1.0,
              "resolution": 32, "image_threshold": 0.5, "map_low": 0.1, "map_high": 0.9}  # fmt: skip


def tiny_export(base: Path, bundle: ClipBundle) -> Path:
    """<base>/serve-model/disc.onnx (and sidecar) of the tiny model with a visual memory, exported once per
    session (`base`: the session's temporary folder) and generated test images in <base>/serve-model/ds."""
    root = base / "serve-model"
    model = root / "disc.onnx"
    if not model.with_suffix(".onnx.json").is_file():
        (root / "data/prompts").mkdir(parents=True, exist_ok=True)
        (root / "data/thresholds").mkdir(exist_ok=True)
        tiny_record(bundle, "disc", memory=True).save(root / "data/prompts/disc.pt")
        (root / "data/thresholds/disc.json").write_text(json.dumps(THRESHOLDS))
        generate(root / "ds", seed=0, n_train=1, n_test=6)
        result = invoke(["export", "--prompts", root / "data/prompts/disc.pt", "--out", model])
        assert result.exit_code == 0, result.output
    return model


def invoke(args: list[Any]) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def predict_rows(model: Path, images: list[Path], out: Path, threshold: float) -> list[dict[str, Any]]:
    """`mpad predict --backend onnx --batch-size 1` on `images`: predictions.json's rows (full floats)."""
    result = invoke(["predict", "--backend", "onnx", "--model", model, *images, "--out", out,
                     "--threshold", threshold, "--batch-size", 1])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads((out / "predictions.json").read_text())["predictions"]


def mid_gap(scores: list[float]) -> float:
    """A threshold midway in the widest gap between the scores: both decisions occur, and no score lies near it."""
    ordered = sorted(scores)
    gap = max(range(len(ordered) - 1), key=lambda i: ordered[i + 1] - ordered[i])
    assert ordered[gap + 1] - ordered[gap] > 1e-3
    return (ordered[gap] + ordered[gap + 1]) / 2


@contextmanager
def running(app: Any, timeout_s: float = 60.0, until: str = "/readyz") -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a free port) from a thread; yields the base URL once `until` answers 200."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY: stages/serve.py
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    # log_config None: uvicorn leaves logging as it is, so that caplog hears the server's lines
    server = uvicorn.Server(server_config(app, None, log_level="info", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while request(url + until)[0] != 200:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not become ready"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        listener.close()


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, Message | dict[str, str]]:
    """(status, body (JSON decoded, else text), headers) of a GET, or a POST of `body`; (0, {}, {}) when no
    server answers."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=None if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, _decoded(response.read(), response.headers), response.headers
    except urllib.error.HTTPError as err:
        return err.code, _decoded(err.read(), err.headers), err.headers
    except (ConnectionError, urllib.error.URLError):
        return 0, {}, {}


def _decoded(data: bytes, headers: Message) -> Any:
    return json.loads(data) if headers.get("content-type", "").startswith("application/json") else data.decode()


def multipart(data: bytes, filename: str = "part.png", field: str = "image") -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with one file field, and its Content-Type header."""
    boundary = "mpad-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
