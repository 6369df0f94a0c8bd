"""Command `serve`: the exported detector as an HTTP service with dynamic batching, and a page to try it.

    mpad serve --model deploy/<category>.onnx [--host 127.0.0.1] [--port 8000] [--max-batch 8]
               [--max-wait-ms 2] [--max-queue 64] [--max-bytes 33554432] [--max-pixels 25000000]
               [--max-size 1024] [--timeout-s 30] [--decode-threads 2] [--max-connections 512]
               [--header-timeout-s 10] [--body-timeout-s 30] [--keep-alive-s 5] [--shutdown-timeout-s 10]
               [--access-log/--no-access-log] [--log-format text|json] [--api-key-file PATH]
               [--threshold T] [--threads N] [--device auto]

Serves an `mpad export` model on onnxruntime (the optional extras `export` and `serve`), without open_clip
or the checkpoint; scores, decisions and maps are `mpad predict --backend onnx`'s. Endpoints and the error
contract: mpad.serve.app. Concurrent requests are batched into one model call of up to --max-batch images,
waiting at most --max-wait-ms for a batch to fill (mpad.serve.batcher).

The API key: read from --api-key-file, else from the environment variable MPAD_API_KEY; without one, /v1/* is
open, and listening on an address other than loopback says so in one warning line. Limits, timeouts, /metrics and
the access log: docs/serving.md.

Checked before it listens: the model and its sidecar (as predict checks them), --threshold finite, the key file,
the address free. Exit status: 1 the model, the extra, the key file or the address cannot be used; stopped by
Ctrl-C or SIGTERM, it answers the requests in progress (for --shutdown-timeout-s at most), then exits with
128 + the signal (130, 143).
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import warnings
from pathlib import Path

import typer

from mpad.config import RANDOM_WEIGHTS_NOTE
from mpad.deploy.sidecar import DeployFileError
from stages.common import fail


def main(
    model: Path = typer.Option(..., "--model", help="ONNX model written by `mpad export` (its sidecar beside it)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one, printed)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Most images in one model call (1: no batching)."),
    max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", min=0, help="Longest wait for a batch to fill."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests in progress at once; more get 503."),
    max_bytes: int = typer.Option(32 * 2**20, "--max-bytes", min=1, help="Largest request body (413 beyond)."),
    max_pixels: int = typer.Option(
        25_000_000, "--max-pixels", min=1, help="Largest image, in pixels (413 beyond); 25 MP: 24.5 MP sensors fit."
    ),
    max_size: int = typer.Option(1024, "--max-size", min=8, help="Longer side cap of the returned overlay and map."),
    timeout_s: float = typer.Option(30.0, "--timeout-s", min=0.001, help="Longest time an answer may take (503)."),
    decode_threads: int = typer.Option(2, "--decode-threads", min=1, help="Threads decoding images, per lane."),
    max_connections: int = typer.Option(512, "--max-connections", min=1, help="Open connections at most (503)."),
    header_timeout_s: float = typer.Option(10.0, "--header-timeout-s", min=0.001, help="Time to send headers (408)."),
    body_timeout_s: float = typer.Option(30.0, "--body-timeout-s", min=0.001, help="Time to send a body (408)."),
    keep_alive_s: float = typer.Option(5.0, "--keep-alive-s", min=0.001, help="Idle keep-alive connections close."),
    shutdown_timeout_s: float = typer.Option(
        10.0, "--shutdown-timeout-s", min=0, help="After SIGTERM, longest wait for requests in progress."
    ),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="One line per request on stdout."),
    log_format: str = typer.Option("text", "--log-format", help="The access log's lines: text | json."),
    api_key_file: Path | None = typer.Option(
        None, "--api-key-file", help="File holding the key /v1/* needs (default: $MPAD_API_KEY; none: open)."
    ),
    threshold: float | None = typer.Option(None, "--threshold", help="Image-score threshold; default: the sidecar's."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="onnxruntime threads (default: one a core)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when onnxruntime has it) | cpu | cuda | cuda:N"),
) -> None:
    """Serve an exported model over HTTP: POST /v1/predict, GET /v1/model, /healthz, /readyz, and a page at /."""
    try:
        import uvicorn

        from mpad.serve.app import Limits, create_app
        from mpad.serve.connections import server_config
        from mpad.serve.model import load_model
    except ImportError as err:
        fail(f"mpad serve needs the extras `serve` and `export` ({err.name} is missing): pip install -e '.[serve]'")
    if threshold is not None and not math.isfinite(threshold):
        fail(f"--threshold {threshold}: not a finite number")
    if log_format not in ("text", "json"):
        fail(f"--log-format {log_format}: not text or json")
    api_key = _api_key(api_key_file)
    try:
        served = load_model(model, threshold, device, threads)
    except DeployFileError as err:
        fail(str(err))
    if served.sidecar.random_weights:
        typer.secho(f"note: {RANDOM_WEIGHTS_NOTE}", err=True, fg=typer.colors.YELLOW)
    limits = Limits(
        max_batch, max_wait_ms, max_queue, max_bytes, max_pixels, max_size, timeout_s, decode_threads,
        max_connections, header_timeout_s, body_timeout_s, keep_alive_s, shutdown_timeout_s,
    )  # fmt: skip
    listener = _listen(host, port)
    _quiet_decoders()
    typer.echo(
        f"serving {model} ({served.sidecar.category}, threshold {served.threshold}) at "
        f"http://{_url_host(host)}:{listener.getsockname()[1]}/",
    )
    if api_key is None and not _loopback(listener):
        typer.secho(
            f"warning: listening on {host}, beyond this machine, without an API key: anyone who reaches it can use "
            "/v1/* (set --api-key-file or MPAD_API_KEY)",
            err=True,
            fg=typer.colors.YELLOW,
        )
    log = log_format if access_log else None
    app = create_app(served, limits, log, api_key)
    uvicorn.Server(server_config(app, log, log_level="info")).run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; exit 1 naming the address when it cannot be had."""
    try:
        family, kind, proto, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it a response's
        # headers and body (two writes) wait ~40 ms for the client's delayed ACK
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as err:
        fail(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})")
    return listener


def _api_key(path: Path | None) -> str | None:
    """The key from `path` (its text, stripped), else from MPAD_API_KEY; None when neither gives one."""
    if path is None:
        return os.environ.get("MPAD_API_KEY", "").strip() or None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        fail(f"--api-key-file {path}: cannot be read ({getattr(err, 'strerror', None) or err})")
    if not key:
        fail(f"--api-key-file {path}: the file is empty")
    return key


def _loopback(listener: socket.socket) -> bool:
    return ipaddress.ip_address(listener.getsockname()[0]).is_loopback


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _quiet_decoders() -> None:
    """The service checks the pixel count itself (--max-pixels), before PIL's decompression-bomb warning would
    fire; decoding threads use one torch thread each (the pool gives the parallelism)."""
    import torch
    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    torch.set_num_threads(1)
