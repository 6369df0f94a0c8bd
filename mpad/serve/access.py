"""Who gets in and what is written of each request: the optional API key, the request id, the access log and
the request metrics, as one ASGI middleware around the app (pure ASGI: Starlette's BaseHTTPMiddleware would
add a task per request).

- API key: when set, /v1/* needs `Authorization: Bearer <key>` (or `X-API-Key: <key>`), else 401; /healthz,
  /readyz, /metrics and the page's HTML stay open (the page asks for the key).
- Request id: the client's X-Request-ID when it is a short token, else a new one; sent back as X-Request-ID.
- Access log: one line per request on the logger `mpad.access`: method, path, status, latency in ms, body
  bytes in and out, the batch the image ran in, the request id; as text or as a JSON object a line.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from mpad.serve.metrics import Metrics

log = logging.getLogger("mpad.access")
FORMATS = ("text", "json")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
UNAUTHORIZED = json.dumps({"error": "missing or wrong API key: send it as Authorization: Bearer <key>"}).encode()


class Access:
    """ASGI middleware: the key check, the request id, the access log (`log_format` text, json or None: off)
    and the request metrics. A route notes the batch size of its image in scope["mpad"]["batch"]."""

    def __init__(
        self, app: Any, metrics: Metrics, endpoints: set[str], log_format: str | None, api_key: str | None
    ) -> None:
        if log_format not in (*FORMATS, None):
            raise ValueError(f"log format {log_format!r}: not one of {', '.join(FORMATS)}")
        self.app, self.metrics, self.endpoints, self.log_format = app, metrics, endpoints, log_format
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        note: dict[str, Any] = {"status": 0, "in": 0, "out": 0, "batch": None}
        scope["mpad"] = note

        async def receiving() -> Any:
            message = await receive()
            note["in"] += len(message.get("body", b""))
            return message

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                note["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                note["out"] += len(message.get("body", b""))
            await send(message)

        try:
            if self.allowed(scope["path"], headers):
                await self.app(scope, receiving, sending)
            else:
                await _answer(sending, 401, UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when --shutdown-timeout-s has passed: one line, no
            # traceback, and a 503 for a client still listening
            logging.getLogger("uvicorn.error").info("%s %s: cancelled at shutdown", scope["method"], scope["path"])
            if note["status"] == 0:
                shutting = json.dumps({"error": "the server is shutting down"}).encode()
                await _answer(sending, 503, shutting, [(b"retry-after", b"1")])
        except Exception:  # answered 500 by Starlette's outermost layer, outside this one
            note["status"] = note["status"] or 500
            raise
        finally:
            self.record(scope, note, request_id, time.perf_counter() - started)

    def allowed(self, path: str, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None or not path.startswith("/v1/"):
            return True
        given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
        return hmac.compare_digest(given, self.api_key)

    def record(self, scope: dict[str, Any], note: dict[str, Any], request_id: str, seconds: float) -> None:
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"  # bounded label values
        status = note["status"] or 499  # no answer started: the client went away (nginx's 499)
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        if self.log_format is None:
            return
        client = scope.get("client")
        line = {
            "client": f"{client[0]}:{client[1]}" if client else None,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "ms": round(seconds * 1000, 1),
            "bytes_in": note["in"],
            "bytes_out": note["out"],
            "batch": note["batch"],
            "id": request_id,
        }
        if self.log_format == "json":
            log.info(json.dumps(line))
        else:
            log.info(" ".join(str(v) if k in ("client", "method", "path", "status") else f"{k}={v}"
                              for k, v in line.items()))  # fmt: skip


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
