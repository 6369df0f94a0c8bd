"""The HTTP service (Starlette, served by uvicorn): routes, limits, the error contract.

    POST /v1/predict[?map=false]  one image (PNG, JPEG or TIFF; the raw bytes, or a multipart form's file)
                                  -> image_score, max_pixel_score, decision, threshold, model (identity),
                                  and unless map=false overlay_png / map_png (base64) and map_size [h, w]
    GET  /v1/model                the sidecar, the threshold in use, the identity
    GET  /healthz                 200 while the process serves
    GET  /readyz                  200 once the model has loaded and a warm-up batch of max_batch has run
    GET  /                        the page (mpad/serve/page.html: no other file, nothing from elsewhere)

Every error is JSON {"error": one line} with a 4xx status naming the problem (mpad.serve.images for the
image checks; 413 for a body over max_bytes, kept by no one: the rest is
read and dropped up to 8x max_bytes so that the client hears the answer), or 503 with Retry-After while warming up,
when `max_queue` requests are already admitted, or when an answer takes longer than `timeout_s`. An
unexpected fault is a JSON 500 without a traceback (the server's log has it).

Work per request: the body is read (up to max_bytes), decoded and resized on a pool of `decode_threads`
threads, queued for the batcher (one model call per batch), and its overlay / map PNGs rendered on the pool
again, so that decoding overlaps inference.

Starlette rather than FastAPI on top of it: the routes need no validation or schema, and FastAPI's layers
(dependency solving, its middleware, serialising the returned dict) were measured as a share of the event
loop's time per request that does not shrink with the batch (README, "Serving").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Any, TypeVar

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mpad.serve.batcher import Batcher, Overloaded
from mpad.serve.images import BadImage, decode_image
from mpad.serve.model import ServedModel

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: the lines go where the server's go
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """The service's knobs (`mpad serve --help` says each)."""

    max_batch: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 64
    max_bytes: int = 32 * 2**20
    max_pixels: int = 25_000_000
    max_size: int = 1024
    timeout_s: float = 30.0
    decode_threads: int = 2


class Unavailable(RuntimeError):
    """503 with Retry-After: not ready yet, overloaded, or out of time."""


class BadQuery(ValueError):
    """422: a query parameter that cannot be read."""


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


def create_app(model: ServedModel, limits: Limits = Limits()) -> Starlette:
    """The service for `model`. The batcher, the decode pool and the warm-up start with the app's lifespan."""
    page = (files("mpad.serve") / "page.html").read_text(encoding="utf-8")
    batcher = Batcher(model.scorer, limits.max_batch, limits.max_wait_ms / 1000, limits.max_queue)
    state: dict[str, Any] = {"ready": False, "admitted": 0, "warm_up_error": None}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["pool"] = ThreadPoolExecutor(limits.decode_threads, thread_name_prefix="mpad-decode")
        batcher.start()
        warm = asyncio.create_task(warm_up())
        try:
            yield
        finally:
            warm.cancel()
            await batcher.stop()
            state["pool"].shutdown(wait=False, cancel_futures=True)

    async def warm_up() -> None:
        try:
            for size in dict.fromkeys((limits.max_batch, 1)):
                await batcher.run_now(torch.zeros(size, 3, *model.input_size))
        except Exception as err:  # stays unready, and says why
            state["warm_up_error"] = f"the warm-up batch failed: {err}"
            log.exception("warm-up failed")
            return
        state["ready"] = True
        log.info("ready: %s, max batch %d, max wait %g ms", model.path, limits.max_batch, limits.max_wait_ms)

    async def on_pool(work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(state["pool"], work, *args)

    async def predict(request: Request) -> Response:
        with_map = query_flag(request, "map", True)
        if not state["ready"]:
            raise Unavailable(state["warm_up_error"] or "warming up: the model is not ready yet")
        if state["admitted"] >= limits.max_queue:
            raise Unavailable(f"overloaded: {limits.max_queue} requests (--max-queue) are already in progress")
        state["admitted"] += 1
        try:
            return JSONResponse(await asyncio.wait_for(answer(request, with_map), limits.timeout_s))
        except asyncio.TimeoutError:
            raise Unavailable(f"no answer within --timeout-s {limits.timeout_s:g}: the server is overloaded") from None
        finally:
            state["admitted"] -= 1

    def prepare(data: bytes) -> tuple[np.ndarray, torch.Tensor]:
        image = decode_image(data, limits.max_pixels)
        return image, model.prepare(image)

    async def answer(request: Request, with_map: bool) -> dict[str, Any]:
        with batcher.on_the_way():
            image, images = await on_pool(prepare, await image_bytes(request, limits.max_bytes))
        amap, score = await batcher.submit(images)
        if not with_map:  # no pixel work left: no hop to the pool
            return model.answer(image, amap, score, None)
        return await on_pool(model.answer, image, amap, score, limits.max_size)

    async def describe(request: Request) -> Response:
        return JSONResponse({**model.describe(), "limits": asdict(limits)})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not state["ready"]:
            raise Unavailable(state["warm_up_error"] or "warming up: the model is not ready yet")
        return JSONResponse({"status": "ready"})

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    routes = [Route("/v1/predict", predict, methods=["POST"]), Route("/v1/model", describe, methods=["GET"]),
              Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"]),
              Route("/", index, methods=["GET"])]  # fmt: skip
    app = Starlette(routes=routes, exception_handlers=error_handlers(), lifespan=lifespan)
    app.state.batcher, app.state.limits, app.state.model = batcher, limits, model
    return app


# A refused body is still read (and dropped) up to this many times --max-bytes before the 413 is sent: a client
# still sending when the server closes gets a connection reset instead of the answer (the kernel discards
# unread data with an RST), so a modestly oversized upload must be heard out. Beyond it, the reset is the answer.
DRAIN_FACTOR = 8


async def _drain(request: Request, budget: int) -> None:
    """Read and drop what is left of the body, `budget` bytes at most."""
    read = 0
    async for chunk in request.stream():
        read += len(chunk)
        if read > budget:
            return


async def image_bytes(request: Request, max_bytes: int) -> bytes:
    """The image's bytes: the body, or the file part of a multipart/form-data body. BadImage 413 once the body
    exceeds `max_bytes` (from Content-Length before reading, else while reading), 400 for a bad form."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        await _drain(request, DRAIN_FACTOR * max_bytes)
        raise BadImage(413, f"body of {declared} bytes, more than --max-bytes {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            await _drain(request, DRAIN_FACTOR * max_bytes)
            raise BadImage(413, f"body of more than --max-bytes {max_bytes} bytes")
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


def error_handlers() -> dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]]:
    """Every error as JSON {"error": one line}: BadImage its 4xx, BadQuery 422, Unavailable 503 + Retry-After,
    Starlette's own (404, 405) their status, anything else 500 without a traceback."""

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": " ".join(message.split())}, status, headers)

    async def bad_image(request: Request, err: BadImage) -> JSONResponse:
        return error(err.status, str(err))

    async def unavailable(request: Request, err: Unavailable | Overloaded) -> JSONResponse:
        return error(503, str(err), {"Retry-After": "1"})

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), err.headers)

    async def bad_query(request: Request, err: BadQuery) -> JSONResponse:
        return error(422, str(err))

    async def fault(request: Request, err: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(err).__name__}); the server's log has the details")

    return {BadImage: bad_image, BadQuery: bad_query, Unavailable: unavailable, Overloaded: unavailable,
            HTTPException: http_error, Exception: fault}  # fmt: skip
