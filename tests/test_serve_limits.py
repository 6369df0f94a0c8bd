"""`mpad serve` on a hostile line (issue 32): slow clients, oversized and aborted bodies, the connection limits,
the decode lanes, /metrics, the access log and the API key. Short limits, few bytes, clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serving import invoke, multipart, request, running, tiny_export

from mpad.features import stack_images
from mpad.serve.app import Limits, create_app
from mpad.serve.images import decode, model_input, open_image
from mpad.serve.lanes import LANE_PIXELS, Lanes, PixelBudget
from mpad.serve.model import load_model

FAST = Limits(max_batch=2, max_queue=2, max_bytes=2**20, max_pixels=400 * 400, header_timeout_s=1.0,
              body_timeout_s=3.0, keep_alive_s=0.5, max_connections=8)  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_clip) -> Path:
    return tiny_export(tmp_path_factory.getbasetemp(), tiny_clip)


@pytest.fixture(scope="module")
def good(model) -> bytes:
    return sorted((model.parent / "ds/disc/test").glob("good/*.png"))[0].read_bytes()


@pytest.fixture(scope="module")
def server(model):
    app = create_app(load_model(model), FAST, log_format="json")
    with running(app) as url:
        yield url, app


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def head(path: str, **headers: object) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """The next answer on `sock`: status, headers, JSON body."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read() or b"{}")


def closed(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (an end of file or a reset within the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def metric(url: str, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when it has not been counted yet)."""
    status, text, _ = request(url + "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_slow_bodies_hold_no_model_place_and_get_408(server, good):
    """Four clients trickling their bodies (more than --max-queue 2) do not stop good requests; each gets 408 once
    --body-timeout-s has passed, and its connection is closed."""
    url, _ = server
    slow = [connect(url) for _ in range(4)]
    for sock in slow:
        sock.sendall(head("/v1/predict", Content_Length=1000) + b"x")
    timed_out = metric(url, "mpad_requests_total", endpoint="/v1/predict", status="408")
    for _ in range(3):
        status, got, _ = request(url + "/v1/predict?map=false", good)
        assert status == 200, got
    # the slow ones were still sending meanwhile (before the fix, they held both --max-queue places: 503)
    assert metric(url, "mpad_requests_total", endpoint="/v1/predict", status="408") == timed_out
    for sock in slow:
        status, headers, got = answer(sock)
        assert status == 408 and "--body-timeout-s 3" in got["error"] and "(1 bytes came)" in got["error"]
        assert headers["connection"] == "close" and closed(sock)
        sock.close()


def test_slow_headers_get_408_idle_connections_close_and_big_headers_431(server):
    url, _ = server
    before = metric(url, "mpad_connections_refused_total", reason="header_timeout")
    partial, idle = connect(url), connect(url)
    partial.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: test\r\n")
    status, headers, got = answer(partial)
    assert status == 408 and "--header-timeout-s 1" in got["error"] and closed(partial)
    assert closed(idle)  # nothing sent: closed without an answer
    keep = connect(url)
    keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    assert answer(keep)[0] == 200
    assert closed(keep)  # idle after its answer: --keep-alive-s
    assert metric(url, "mpad_connections_refused_total", reason="header_timeout") == before + 2
    big = connect(url)
    big.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Filler: " + b"a" * 70_000 + b"\r\n\r\n")
    status, _, got = answer(big)
    assert status == 431 and "request headers over 65536 bytes" in got["error"] and closed(big)
    for sock in (partial, idle, keep, big):
        sock.close()


def test_connections_over_the_cap_get_503(model):
    app = create_app(load_model(model), Limits(max_connections=3, header_timeout_s=30), log_format=None)
    with running(app) as url:
        held = [connect(url) for _ in range(3)]
        extra = connect(url)
        status, headers, got = answer(extra)
        assert status == 503 and "--max-connections 3" in got["error"] and headers["retry-after"] == "1"
        assert closed(extra)
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 30
        while request(url + "/healthz")[0] != 200:  # once the server has heard the closes
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert metric(url, "mpad_connections_refused_total", reason="max_connections") >= 1
        extra.close()


def test_oversized_bodies_are_refused_from_their_headers(server, good):
    url, _ = server
    expecting = connect(url)  # curl's way: it waits for 100 Continue before sending the body
    expecting.sendall(head("/v1/predict", Content_Length=2**21, Expect="100-continue"))
    assert expecting.recv(64).startswith(b"HTTP/1.1 413 ")  # no "HTTP/1.1 100 Continue" first
    silent = connect(url)  # no body sent at all: the answer cannot wait for it
    silent.sendall(head("/v1/predict", Content_Length=2**21))
    status, headers, got = answer(silent)
    assert status == 413 and "body of 2097152 bytes, more than --max-bytes 1048576" in got["error"]
    assert headers["connection"] == "close" and closed(silent)
    chunked = connect(url)  # no length announced: 413 once 1 MiB has passed, the rest never sent
    chunked.sendall(head("/v1/predict", Transfer_Encoding="chunked"))
    piece = b"x" * 65536
    for _ in range(17):
        chunked.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    status, headers, got = answer(chunked)
    assert status == 413 and "body of more than --max-bytes 1048576 bytes" in got["error"] and closed(chunked)
    status, got, _ = request(url + "/v1/predict?map=false", good + bytes(2**20))  # sent in full before reading
    assert status == 413 and "--max-bytes" in got["error"]
    for sock in (expecting, silent, chunked):
        sock.close()


def test_an_aborted_upload_is_one_info_line_and_a_count(server, good, caplog):
    url, _ = server
    before = metric(url, "mpad_aborted_uploads_total")
    with caplog.at_level(logging.INFO):
        sock = connect(url)
        sock.sendall(head("/v1/predict", Content_Length=50_000) + good[:1000])
        sock.close()
        deadline = time.monotonic() + 30
        while metric(url, "mpad_aborted_uploads_total") == before:
            assert time.monotonic() < deadline, "the abort was not counted"
            time.sleep(0.05)
    lines = [r for r in caplog.records if "upload aborted" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "after 1000 of 50000 bytes" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mpad.access"]
    assert [(line["path"], line["status"], line["bytes_in"]) for line in logged if line["status"] == 499] == [
        ("/v1/predict", 499, 1000)
    ]


def test_access_log_and_request_id(server, good, caplog):
    url, _ = server
    with caplog.at_level(logging.INFO, logger="mpad.access"):
        status, got, headers = request(url + "/v1/predict?map=false", good, {"X-Request-ID": "part-42"})
        assert status == 200 and got["batch"] == 1 and headers["x-request-id"] == "part-42"
        assert request(url + "/v1/nothing")[0] == 404
        logged = lambda: [json.loads(r.getMessage()) for r in caplog.records if r.name == "mpad.access"]  # noqa: E731
        deadline = time.monotonic() + 30  # the line is written just after the answer has gone
        while len(logged()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    first, second = logged()[-2:]
    assert {k: first[k] for k in ("method", "path", "status", "bytes_in", "batch", "id")} == {
        "method": "POST", "path": "/v1/predict", "status": 200, "bytes_in": len(good), "batch": 1, "id": "part-42"
    }  # fmt: skip
    assert first["ms"] > 0 and first["bytes_out"] > 0 and first["client"].startswith("127.0.0.1:")
    assert (second["status"], second["batch"], len(second["id"])) == (404, None, 16)


def test_text_access_log_and_none(model, good, caplog):
    for log_format in ("text", None):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mpad.access"), running(create_app(load_model(model), FAST,
                                                                                     log_format)) as url:  # fmt: skip
            assert request(url + "/v1/predict?map=false", good, {"X-Request-ID": "r1"})[0] == 200
        lines = [r.getMessage() for r in caplog.records if r.name == "mpad.access" and "/v1/predict" in r.getMessage()]
        if log_format is None:
            assert lines == []
        else:
            assert len(lines) == 1 and " POST /v1/predict 200 ms=" in lines[0]
            assert f"bytes_in={len(good)} " in lines[0] and "batch=1 id=r1" in lines[0]


def test_metrics_count_requests_batches_and_the_queue(server, good):
    url, _ = server
    before = metric(url, "mpad_requests_total", endpoint="/v1/predict", status="200")
    batches = metric(url, "mpad_batch_size_count")
    for _ in range(3):
        assert request(url + "/v1/predict?map=false", good)[0] == 200
    request(url + "/v1/nothing/else")
    assert metric(url, "mpad_requests_total", endpoint="/v1/predict", status="200") == before + 3
    assert metric(url, "mpad_batch_size_count") == batches + 3 and metric(url, "mpad_model_seconds_count") >= 3
    assert metric(url, "mpad_request_seconds_count", endpoint="/v1/predict") >= 3
    assert metric(url, "mpad_requests_total", endpoint="other", status="404") >= 1  # not one label per path
    assert metric(url, "mpad_queue_depth") == 0 and metric(url, "mpad_requests_admitted") == 0


def test_api_key_guards_v1_only(model, good):
    app = create_app(load_model(model), FAST, log_format=None, api_key="s3cret")
    with running(app) as url:
        status, got, headers = request(url + "/v1/model")
        assert status == 401 and "API key" in got["error"] and headers["www-authenticate"] == "Bearer"
        assert request(url + "/v1/predict", good, {"Authorization": "Bearer wrong"})[0] == 401
        assert request(url + "/v1/model", None, {"Authorization": "Bearer s3cret"})[0] == 200
        assert request(url + "/v1/predict?map=false", good, {"X-API-Key": "s3cret"})[0] == 200
        for path in ("/", "/healthz", "/readyz", "/metrics"):
            assert request(url + path)[0] == 200, path


def test_model_shows_file_names_not_paths(server):
    url, _ = server
    info = request(url + "/v1/model")[1]
    assert info["onnx_model"] == "disc.onnx" and info["prompts"] == "disc.pt"
    assert "/" not in json.dumps({k: v for k, v in info.items() if k != "limits"})


def test_multipart_complaints_go_through_logging(server, good, caplog):
    """python-multipart's own warning is a log record (mpad serve's logging prints it with a level prefix)."""
    url, _ = server
    body, headers = multipart(good)
    with caplog.at_level(logging.INFO):
        assert request(url + "/v1/predict", b"\xff" + body, headers)[0] == 400
    assert any(r.name.startswith("python_multipart") for r in caplog.records)


def test_model_input_equals_stack_images_without_the_full_float_copy():
    rng = np.random.default_rng(0)
    for height, width in ((112, 96), (1000, 1333), (40, 33), (64, 64), (130, 64), (64, 300)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for size in ((64, 64), (224, 224), (240, 240)):
            assert torch.equal(model_input(image, size), stack_images([image], size)), (height, width, size)


def test_a_large_jpeg_is_decoded_at_reduced_size():
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1600), (90, 120, 150)).save(buffer, "JPEG")
    im = open_image(buffer.getvalue(), 25_000_000)
    decoded = decode(im, (64, 64), 256)
    assert im.size == (500, 400)  # draft: 1/4, the largest reduction that keeps the longer side >= 256
    assert decoded.picture.shape == (205, 256, 3) and decoded.input.shape == (1, 3, 64, 64)
    assert abs(float(decoded.input[0, 2].mean()) - 150 / 255) < 0.01  # the colour is the image's
    alone = decode(open_image(buffer.getvalue(), 25_000_000), (64, 64), 256, picture=False)
    assert alone.picture is None and torch.equal(alone.input, decoded.input)  # the score does not depend on ?map


def test_pixel_budget_holds_pixels_in_arrival_order():
    async def scenario() -> None:
        budget = PixelBudget(10)
        await budget.acquire(6)
        second = asyncio.ensure_future(budget.acquire(6))
        third = asyncio.ensure_future(budget.acquire(1))  # it would fit, but waits its turn behind the second
        giving_up = asyncio.ensure_future(budget.acquire(50))  # more than the budget: holds all of it
        await asyncio.sleep(0)
        assert not second.done() and not third.done() and budget.held == 6
        budget.release(6)
        await asyncio.sleep(0)
        assert second.done() and third.done() and budget.held == 7 and not giving_up.done()
        giving_up.cancel()
        await asyncio.gather(giving_up, return_exceptions=True)
        budget.release(6)
        budget.release(1)
        await budget.acquire(50)
        assert budget.held == 10 and not budget.waiting

    asyncio.run(scenario())


def test_a_small_image_never_waits_behind_large_ones():
    """One decode thread per lane, both large decodes blocked: a small image is decoded at once all the same."""
    blocked = threading.Event()

    def large() -> str:
        assert blocked.wait(60)
        return "large"

    async def scenario() -> None:
        lanes = Lanes(1, LANE_PIXELS * 4)
        try:
            waiting = [asyncio.ensure_future(lanes.run(LANE_PIXELS * 3, large)) for _ in range(2)]
            assert await asyncio.wait_for(lanes.run(LANE_PIXELS, lambda: "small"), 30) == "small"
            assert lanes.budget.held == LANE_PIXELS * 3 and not any(w.done() for w in waiting)
            blocked.set()
            assert await asyncio.gather(*waiting) == ["large", "large"] and lanes.budget.held == 0
        finally:
            blocked.set()
            lanes.shutdown()

    asyncio.run(scenario())


def test_cli_reads_the_key_and_warns_beyond_loopback(model, tmp_path, monkeypatch):
    import uvicorn

    import stages.serve

    served: list = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.append(self.config.app))
    keyfile = tmp_path / "key"
    keyfile.write_text("k3y\n")
    result = invoke(["serve", "--model", model, "--port", 0, "--api-key-file", keyfile])
    assert result.exit_code == 0 and "warning" not in result.stderr
    monkeypatch.setenv("MPAD_API_KEY", "from-env")
    monkeypatch.setattr(stages.serve, "_loopback", lambda listener: False)  # as if bound to 0.0.0.0
    result = invoke(["serve", "--model", model, "--port", 0, "--log-format", "json"])
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert [app.user_middleware[0].kwargs["api_key"] for app in served] == ["k3y", "from-env"]
    assert served[1].user_middleware[0].kwargs["log_format"] == "json"
    monkeypatch.delenv("MPAD_API_KEY")
    result = invoke(["serve", "--model", model, "--port", 0, "--no-access-log"])
    assert result.exit_code == 0 and served[2].user_middleware[0].kwargs["log_format"] is None
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "without an API key" in warnings[0]
    for args, words in (
        (["--api-key-file", tmp_path / "none"], "cannot be read"),
        (["--api-key-file", tmp_path / "empty"], "the file is empty"),
        (["--log-format", "xml"], "--log-format xml: not text or json"),
    ):
        (tmp_path / "empty").write_text(" \n")
        result = invoke(["serve", "--model", model, "--port", 0, *args])
        assert result.exit_code == 1 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_shutdown_closes_clients_still_sending(model, good):
    """SIGTERM with a client trickling its body: after --shutdown-timeout-s it is answered 503 and the process
    exits, without a traceback; the access log's lines are on stdout, python-multipart's warning has uvicorn's
    level prefix."""
    command = [sys.executable, "-m", "stages", "serve", "--model", str(model), "--port", "0",
               "--shutdown-timeout-s", "1", "--body-timeout-s", "300", "--timeout-s", "300"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    try:
        url = proc.stdout.readline().rsplit(" at ", 1)[1].strip().rstrip("/")
        deadline = time.monotonic() + 60
        while request(url + "/readyz")[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        slow = connect(url)
        slow.sendall(head("/v1/predict", Content_Length=1000) + b"x")

        def trickle() -> None:
            with contextlib.suppress(OSError):
                while not stop.wait(0.2):
                    slow.sendall(b"x")

        threading.Thread(target=trickle, daemon=True).start()
        # answered after the slow client's headers arrived: by then the server has read them
        assert request(url + "/v1/predict?map=false", good)[0] == 200
        body, headers = multipart(good)
        assert request(url + "/v1/predict", b"\xff" + body, headers)[0] == 400
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)  # the trickle alone would last 200 s
        status, _, got = answer(slow)
        assert status == 503 and got["error"] == "the server is shutting down"
    finally:
        stop.set()
        proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err and "Exception in ASGI" not in err, err
    boundary = [line for line in err.splitlines() if "boundary" in line]
    assert boundary and all(line.startswith(("WARNING:", "INFO:", "DEBUG:")) for line in boundary), err
    assert " POST /v1/predict 200 ms=" in out and "cancelled at shutdown" in err
