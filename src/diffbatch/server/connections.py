"""uvicorn as ``serve`` (and the live-server tests) run it: its configuration, from one function, and its h11
protocol with the deadlines uvicorn lacks. uvicorn times a connection out only while it is idle after a
response (``timeout_keep_alive``): a client that trickles a request's head or body a byte at a time
(slowloris) holds its connection for ever, and ``limit_concurrency`` answers 503 to requests without capping
the connections themselves.

Deadlines, by what the connection waits for:

- a request's head (request line and headers): ``header_timeout`` from the connection's start, or from the end
  of the previous response; then closed (no answer: the client has not asked anything yet);
- its body: ``body_timeout`` from the end of its head, for the whole body; then 408 and closed;
- the app (generating images, any time): none; a client that goes away is seen by the routes.

Beyond ``max_connections`` open connections, a new one takes the place of the one that has waited longest
for a request's head (idle keep-alive or trickling: a client that sends its request at once is never the
oldest), so head tricklers cannot starve others; when every connection is busy with a body or the app, the
new one is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServerConfig
from .schemas import ApiError

log = logging.getLogger("diffbatch.server")
HEAD, BODY, APP = "head", "body", "app"  # what a connection waits for
MAX_LOGGED_PATH = 200  # characters of a request's path and query an access-log line keeps


def uvicorn_config(app: Any, config: ServerConfig, **overrides: Any) -> uvicorn.Config:
    """The one uvicorn configuration: ``serve`` and tests differ only in ``overrides`` (log level)."""
    made = uvicorn.Config(app, host=config.host, port=config.port, http=protocol_factory(config),
                          timeout_graceful_shutdown=int(config.drain_seconds), **overrides)
    access = logging.getLogger("uvicorn.access")  # configured by the Config just made
    if not any(isinstance(f, ShortAccessLines) for f in access.filters):
        access.addFilter(ShortAccessLines())
    return made


class ShortAccessLines(logging.Filter):
    """An access-log line with its path (query string included) cut to ``MAX_LOGGED_PATH`` characters: a client's
    60 KB query string is not a log line, and one per request fills a disk."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and len(args[2]) > MAX_LOGGED_PATH:
            path = args[2]
            record.args = (*args[:2], f"{path[:MAX_LOGGED_PATH]}...({len(path)} characters)", *args[3:])
        return True


def protocol_factory(config: ServerConfig) -> Any:
    """uvicorn builds one protocol per connection, with its own keyword arguments; ours adds the limits."""
    return functools.partial(DeadlineProtocol, limits=config)


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's head and body and a cap on connections."""

    def __init__(self, *args: Any, limits: ServerConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.waiting_for: str | None = None
        self.waiting_since = 0.0
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_longest_waiting():
            log.warning("%d open connections, all busy: one refused", self.limits.max_connections)
            transport.write(_raw_answer(503, f"{self.limits.max_connections} open connections, all busy; retry later"))
            transport.close()
            return
        self._follow()

    def _evict_longest_waiting(self) -> bool:
        waiting = [c for c in self.connections if isinstance(c, DeadlineProtocol) and c.waiting_for == HEAD
                   and not c.transport.is_closing()]
        if not waiting:
            return False
        min(waiting, key=lambda c: c.waiting_since).transport.abort()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _now_waiting_for(self) -> str:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return HEAD
        return BODY if cycle.more_body else APP

    def _follow(self) -> None:
        """Start the deadline of what the connection now waits for (kept while it waits for the same thing:
        trickled bytes do not extend it)."""
        waiting_for = self._now_waiting_for()
        if waiting_for == self.waiting_for or self.transport.is_closing():
            return
        self.waiting_for, self.waiting_since = waiting_for, self.loop.time()
        self._cancel()
        seconds = {HEAD: self.limits.header_timeout, BODY: self.limits.body_timeout}.get(waiting_for)
        if seconds is not None:
            self.deadline = self.loop.call_later(seconds, self._expire)

    def _cancel(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self) -> None:
        if self.transport.is_closing():
            return
        if self.waiting_for == BODY and not self.cycle.response_started:
            self._answer_timeout()
        # a client that does not read what it was sent would otherwise keep a closing transport open
        (self.transport.abort if self.transport.get_write_buffer_size() else self.transport.close)()

    def _answer_timeout(self) -> None:
        body = _error_json(408, f"the request body did not arrive within {self.limits.body_timeout:g} s")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=408, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # h11 is past the point of answering: the connection is only closed


def _error_json(status: int, message: str) -> bytes:
    return json.dumps(ApiError(status, message, kind="server_error" if status >= 500 else "invalid_request_error")
                      .body()).encode()


def _raw_answer(status: int, message: str) -> bytes:
    """An answer written before h11 has seen a request (it cannot write one then)."""
    body = _error_json(status, message)
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n")
    return head.encode() + body

