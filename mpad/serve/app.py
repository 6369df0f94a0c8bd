"""The HTTP service (Starlette, served by uvicorn): routes, limits, the error contract.

    POST /v1/predict[?map=false]  one image (PNG, JPEG or TIFF; the raw bytes, or a multipart form's file)
                                  -> image_score, max_pixel_score, decision, threshold, model (identity),
                                  batch (the images in its model call), and unless map=false overlay_png /
                                  map_png (base64) and map_size [h, w]
    GET  /v1/model                the sidecar (files by name), the threshold in use, the identity, the limits
    GET  /healthz                 200 while the process serves
    GET  /readyz                  200 once the model has loaded and a warm-up batch of max_batch has run
    GET  /metrics                 Prometheus' text format (mpad.serve.metrics)
    GET  /                        the page (mpad/serve/page.html: no other file, nothing from elsewhere)

Every error is JSON {"error": one line} with a 4xx status naming the problem (mpad.serve.images for the
image checks), or 503 with Retry-After while warming up, when `max_queue` requests are already admitted, or
when an answer takes longer than `timeout_s`. A body is refused with 413 from its Content-Length before any of it
is read (no `100 Continue`), or as soon as a chunked body passes `max_bytes`; a body not read within
`body_timeout_s` gets 408; both close the connection (mpad.serve.connections' lingering close). A client that
closes its connection while sending is one INFO line and a count in /metrics. An unexpected fault is a JSON 500
without a traceback (the server's log has it). The key check and the access log: mpad.serve.access.

Work per request: the body is read (up to max_bytes, within body_timeout_s) before the request takes one of
`max_queue` places, so that clients still sending hold no model capacity; the image's header is checked, its
pixels decoded and resized on a decode lane (mpad.serve.lanes: small images never wait behind large ones, and
the pixels being decoded at once are bounded), queued for the batcher (one model call per batch), and its
overlay / map PNGs rendered on the small lane again, so that decoding overlaps inference.

Starlette rather than FastAPI on top of it: the routes need no validation or schema, and FastAPI's layers
(dependency solving, its middleware, serialising the returned dict) were measured as a share of the event
loop's time per request that does not shrink with the batch (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mpad.serve.access import Access
from mpad.serve.batcher import Batcher, Overloaded
from mpad.serve.images import BadImage, decode, open_image
from mpad.serve.lanes import Lanes
from mpad.serve.metrics import CONTENT_TYPE, Metrics
from mpad.serve.model import ServedModel

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: the lines go where the server's go


@dataclass(frozen=True)
class Limits:
    """The service's knobs (`mpad serve --help` says each)."""

    max_batch: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 64
    max_bytes: int = 32 * 2**20
    # 25 megapixels: the largest common inspection sensors (24.5 MP: 5328x4608, Sony IMX540) and every smaller one
    max_pixels: int = 25_000_000
    max_size: int = 1024
    timeout_s: float = 30.0
    decode_threads: int = 2
    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    shutdown_timeout_s: float = 10.0


class Unavailable(RuntimeError):
    """503 with Retry-After: not ready yet, overloaded, or out of time."""


class BadQuery(ValueError):
    """422: a query parameter that cannot be read."""


class Aborted(ConnectionError):
    """The client closed its connection while sending its body."""


# What a boolean query parameter may say (pydantic's spellings, which the service accepted before).
FLAGS = {
    **dict.fromkeys(("true", "1", "yes", "on", "t", "y"), True),
    **dict.fromkeys(("false", "0", "no", "off", "f", "n"), False),
}


def query_flag(request: Request, name: str, default: bool) -> bool:
    """The boolean query parameter `name`; BadQuery naming it and the accepted values otherwise."""
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return FLAGS[value.lower()]
    except KeyError:
        raise BadQuery(f"query.{name}: {value!r} is not a boolean (true or false)") from None


def create_app(
    model: ServedModel, limits: Limits = Limits(), log_format: str | None = "text", api_key: str | None = None
) -> Starlette:
    """The service for `model`, with its access log (`log_format` text, json or None) and, when given, the API
    key that /v1/* needs (mpad.serve.access). The batcher, the decode lanes and the warm-up start with the
    app's lifespan. `app.state.metrics` is mpad.serve.metrics.Metrics (its `refused` hears the connections'
    refusals: mpad.serve.connections.server_config)."""
    page = (files("mpad.serve") / "page.html").read_text(encoding="utf-8")
    state: dict[str, Any] = {"ready": False, "admitted": 0, "warm_up_error": None}
    batcher = Batcher(model.scorer, limits.max_batch, limits.max_wait_ms / 1000, limits.max_queue)
    metrics = Metrics(limits.max_batch, lambda: batcher.queue.qsize(), lambda: state["admitted"])
    batcher.observe = metrics.batch

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["lanes"] = Lanes(limits.decode_threads, limits.max_pixels)
        batcher.start()
        warm = asyncio.create_task(warm_up())
        try:
            yield
        finally:
            warm.cancel()
            await batcher.stop()
            state["lanes"].shutdown()

    async def warm_up() -> None:
        try:
            for size in dict.fromkeys((limits.max_batch, 1)):
                await batcher.run_now(torch.zeros(size, 3, *model.input_size))
        except Exception as err:  # stays unready, and says why
            state["warm_up_error"] = f"the warm-up batch failed: {err}"
            log.exception("warm-up failed")
            return
        state["ready"] = True
        log.info("ready: %s, max batch %d, max wait %g ms", model.path.name, limits.max_batch, limits.max_wait_ms)

    async def predict(request: Request) -> Response:
        with_map = query_flag(request, "map", True)
        if not state["ready"]:
            raise Unavailable(state["warm_up_error"] or "warming up: the model is not ready yet")
        data = await image_bytes(request, limits.max_bytes, limits.body_timeout_s)
        if state["admitted"] >= limits.max_queue:  # only now: a client still sending holds no place
            raise Unavailable(f"overloaded: {limits.max_queue} requests (--max-queue) are already in progress")
        state["admitted"] += 1
        try:
            return JSONResponse(await asyncio.wait_for(answer(request, data, with_map), limits.timeout_s))
        except asyncio.TimeoutError:
            raise Unavailable(f"no answer within --timeout-s {limits.timeout_s:g}: the server is overloaded") from None
        finally:
            state["admitted"] -= 1

    async def answer(request: Request, data: bytes, with_map: bool) -> dict[str, Any]:
        im = open_image(data, limits.max_pixels)  # the header only: cheap, and the 4xx that need no pixels
        with batcher.on_the_way():
            decoded = await state["lanes"].run(
                im.width * im.height, decode, im, model.input_size, limits.max_size, with_map
            )
        amap, score, size = await batcher.submit(decoded.input)
        request.scope["mpad"]["batch"] = size
        if decoded.picture is None:  # no pixel work left: no hop to a lane
            out = model.answer(None, amap, score, limits.max_size)
        else:
            out = await state["lanes"].run(decoded.picture.size // 3, model.answer, decoded.picture, amap, score,
                                           limits.max_size)  # fmt: skip
        return {**out, "batch": size}

    async def describe(request: Request) -> Response:
        return JSONResponse({**model.describe(), "limits": asdict(limits)})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not state["ready"]:
            raise Unavailable(state["warm_up_error"] or "warming up: the model is not ready yet")
        return JSONResponse({"status": "ready"})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    routes = [Route("/v1/predict", predict, methods=["POST"]), Route("/v1/model", describe, methods=["GET"]),
              Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"]), Route("/", index, methods=["GET"])]  # fmt: skip
    app = Starlette(routes=routes, exception_handlers=error_handlers(metrics), lifespan=lifespan)
    app.state.batcher, app.state.limits, app.state.model, app.state.metrics = batcher, limits, model, metrics
    app.add_middleware(Access, metrics=metrics, endpoints={r.path for r in routes}, log_format=log_format,
                       api_key=api_key)  # fmt: skip
    return app


async def image_bytes(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The image's bytes: the body, or the file part of a multipart/form-data body. BadImage 413 when the body
    exceeds `max_bytes` (from Content-Length before reading, else as soon as a chunked body passes it), 408
    when it has not arrived within `timeout_s`, 400 for a bad form; Aborted when the client went away."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BadImage(413, f"body of {declared} bytes, more than --max-bytes {max_bytes}")
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_bytes:
                raise BadImage(413, f"body of more than --max-bytes {max_bytes} bytes")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        late = f"body not received within --body-timeout-s {timeout_s:g} ({len(body)} bytes came)"
        raise BadImage(408, late) from None
    except ClientDisconnect:
        raise Aborted(f"after {len(body)} of {declared or 'an unknown number of'} bytes") from None
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return bytes(body)

    async def once() -> AsyncIterator[bytes]:
        yield bytes(body)

    try:
        form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=16).parse()
    except MultiPartException as err:
        raise BadImage(400, f"malformed multipart body: {err}") from err
    uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    try:
        if not uploads:
            raise BadImage(400, "multipart body without a file part: send the image as a file field")
        return await uploads[0].read()
    finally:
        await form.close()


# Refusals that leave a body unread: the connection is closed after the answer (mpad.serve.connections lingers).
CLOSING = (408, 413)


def error_handlers(metrics: Metrics) -> dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]]:
    """Every error as JSON {"error": one line}: BadImage its 4xx (408 and 413 closing the connection), BadQuery
    422, Unavailable 503 + Retry-After, Starlette's own (404, 405) their status, Aborted one INFO line and
    no answer (its client is gone), anything else 500 without a traceback."""

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": " ".join(message.split())}, status, headers)

    async def bad_image(request: Request, err: BadImage) -> JSONResponse:
        return error(err.status, str(err), {"Connection": "close"} if err.status in CLOSING else None)

    async def aborted(request: Request, err: Aborted) -> Response:
        metrics.aborted.inc()
        client = request.client
        log.info("%s: upload aborted by the client %s", f"{client.host}:{client.port}" if client else "?", err)
        return Response(status_code=499)  # never sent (the client is gone); the access log's status

    async def unavailable(request: Request, err: Unavailable | Overloaded) -> JSONResponse:
        return error(503, str(err), {"Retry-After": "1"})

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), err.headers)

    async def bad_query(request: Request, err: BadQuery) -> JSONResponse:
        return error(422, str(err))

    async def fault(request: Request, err: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(err).__name__}); the server's log has the details")

    return {BadImage: bad_image, BadQuery: bad_query, Unavailable: unavailable, Overloaded: unavailable,
            Aborted: aborted, HTTPException: http_error, Exception: fault}  # fmt: skip
