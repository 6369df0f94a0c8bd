"""The connections: uvicorn's settings from the service's Limits, and what uvicorn lacks for a hostile network.

uvicorn already gives: the idle keep-alive limit (`timeout_keep_alive` = --keep-alive-s) and the shutdown limit
(`timeout_graceful_shutdown` = --shutdown-timeout-s: after it, requests still running are cancelled and the
process exits). Its `limit_concurrency` answers 503 only once a request's headers have arrived, so connections
that send nothing would still pile up; and it has no limit on the time or the size of a request's headers.
`guarded` adds these to uvicorn's httptools protocol:

- a cap on open connections (--max-connections): one over it gets 503 at once and is closed;
- headers must arrive within --header-timeout-s (408 and closed; a connection that sent nothing is closed
  silently) and within MAX_HEADER_BYTES (431 and closed);
- a lingering close: when an answer closes the connection before the request's body was read (413, 408),
  the server stops writing but reads and drops what the client still sends, for LINGER_BYTES at most and
  until the keep-alive limit, so that the client reads the answer instead of a connection reset (what the
  kernel sends when a socket closes with unread data).

The body's own time limit (--body-timeout-s) and size limit (--max-bytes) are the app's (mpad.serve.app).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import uvicorn
import uvicorn.config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("uvicorn.error")
MAX_HEADER_BYTES = 64 * 2**10  # as nginx's large_client_header_buffers (4 x 8 KB) and then some
LINGER_BYTES = 8 * 2**20  # what a refused client may still send before the connection is reset


@dataclass(frozen=True)
class Guard:
    """The connection limits, and what hears of each refusal (a reason: /metrics' mpad_connections_refused)."""

    max_connections: int
    header_timeout_s: float
    refused: Callable[[str], None] = lambda reason: None


def server_config(app: Any, log_format: str | None = "text", **options: Any) -> uvicorn.Config:
    """uvicorn's Config for `app` (mpad.serve.app.create_app's, whose limits and metrics it reads), with uvicorn's
    logging and `log_format`'s access log on stdout (text or json; None: none); `options` go to uvicorn.Config."""
    limits = app.state.limits
    guard = Guard(
        limits.max_connections, limits.header_timeout_s, lambda why: app.state.metrics.refused.labels(why).inc()
    )
    options.setdefault("log_config", log_config(log_format))
    return uvicorn.Config(
        app,
        http=guarded(guard),
        access_log=False,  # uvicorn's own: mpad.serve.access writes the richer one
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]  # call_later takes a float
        timeout_graceful_shutdown=limits.shutdown_timeout_s,  # type: ignore[arg-type]
        **options,
    )


def log_config(log_format: str | None) -> dict[str, Any]:
    """uvicorn's logging configuration, plus the access log (mpad.serve.access) on stdout, as uvicorn's text lines
    or as bare JSON lines, and python-multipart's warnings through uvicorn's handler."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["bare"] = {"format": "%(message)s"}
    config["handlers"]["mpad_access"] = {
        "formatter": "bare" if log_format == "json" else "default",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    config["loggers"]["mpad.access"] = {
        "handlers": ["mpad_access"] if log_format else [],
        "level": "INFO",
        "propagate": False,
    }
    config["loggers"]["python_multipart"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def guarded(guard: Guard) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with `guard`'s limits (see the module's docstring)."""
    return type("GuardedProtocol", (_Guarded,), {"guard": guard})


def raw_response(status: int, message: str) -> bytes:
    """An HTTP/1.1 answer {"error": message} that closes the connection, written without the app."""
    body = json.dumps({"error": message}).encode()
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
    head += "retry-after: 1\r\n" if status == 503 else ""
    return f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body


class _Guarded(HttpToolsProtocol):
    guard: Guard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.header_bytes: int | None = 0  # bytes of the headers being read; None between requests
        self.lingering: int | None = None  # bytes still dropped before the connection is closed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.guard.max_connections:
            self.refuse(503, "max_connections", f"more than --max-connections {self.guard.max_connections} open")
            return
        self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self.headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:  # a refused body: dropped
            self.lingering -= len(data)
            if self.lingering < 0:
                self.transport.close()
            return
        if self.header_bytes is not None:  # headers being read: those in `data` end at the blank line, if any
            end = data.find(b"\r\n\r\n")
            self.header_bytes += len(data) if end < 0 else end
            if self.header_bytes > MAX_HEADER_BYTES:
                self.refuse(431, "header_too_large", f"request headers over {MAX_HEADER_BYTES} bytes")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.header_timer is None:  # a keep-alive connection's next request: the limit starts with its first byte
            self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self.headers_late)

    def on_headers_complete(self) -> None:
        self.stop_header_timer()
        self.header_bytes = None
        super().on_headers_complete()
        self.cycle.transport = _Lingering(self)  # type: ignore[assignment]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.header_bytes = 0  # what comes next on the connection is another request's headers

    def headers_late(self) -> None:
        self.header_timer = None
        if self.header_bytes:
            self.refuse(408, "header_timeout", f"request headers not received within --header-timeout-s "
                        f"{self.guard.header_timeout_s:g}")  # fmt: skip
        elif not self.transport.is_closing():  # nothing sent: an idle connection, closed without a word
            self.guard.refused("header_timeout")
            self.transport.close()

    def stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def refuse(self, status: int, reason: str, message: str) -> None:
        """Answer `status` without the app, and close."""
        self.stop_header_timer()
        self.guard.refused(reason)
        log.info("%s: %s (%s)", _client(self.client), message, status)
        self.transport.write(raw_response(status, message))
        self.transport.close()

    def linger(self) -> None:
        """Close after an answer: at once when the request was read in full, else once the client stops sending
        (or LINGER_BYTES more came, or the keep-alive limit passed)."""
        if self.cycle is None or not self.cycle.more_body or self.transport.is_closing():
            self.transport.close()
            return
        self.lingering = LINGER_BYTES  # uvicorn's keep-alive timer, armed after every answer, ends it in time
        self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()


class _Lingering:
    """The transport as a request's cycle sees it: its close() is the protocol's lingering close."""

    def __init__(self, protocol: _Guarded) -> None:
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol.transport, name)

    def close(self) -> None:
        self._protocol.linger()


def _client(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
