"""The server's HTTP side under the app: the socket, uvicorn, and what one client may hold.

    sock = bind("127.0.0.1", 8000)      # before loading: a port in use is one line at once
    ...                                 # load and compile (connections are refused meanwhile)
    server = Server(uvicorn.Config(Guard(app, ...), http=connection_class(limits), ...), on_listen,
                    drain_timeout, on_overdue)
    server.run(sockets=[sock])          # `on_listen` runs once the socket listens

Bounds, each a flag of `python -m infer.serve`:
- a request's headers must arrive within `Limits.request_timeout` seconds of the connection
  opening or of the previous answer (`Connection`; else the connection is closed), and its
  body within as many seconds of its headers (`Guard`; else 408 and the connection closed):
  a client that stalls, or trickles, holds nothing for long;
- one client address holds at most `Limits.per_client` connections at once; more are
  answered 429 and closed as they open (`Connection`);
- bodies over `Guard.max_body_bytes` get 413; with an API key every path but /health
  wants `Authorization: Bearer KEY` (compared as UTF-8 bytes, so any key works).

uvicorn's own HTTP/1.1 protocol (h11) does the parsing; `Connection` only adds the two
connection bounds to it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import http
import json
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from infer.openai_api import ApiError


@dataclasses.dataclass(frozen=True)
class Limits:
    """request_timeout: seconds a request's headers, and then its body, may take to arrive.
    per_client: connections one client address may hold at once."""

    request_timeout: float = 30.0
    per_client: int = 64


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening (connections are refused until the
    server listens). OSError with one line when the address cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (socket.gaierror, OSError) as err:
        raise OSError(f"--host {host}: not an address to listen on ({err.strerror or err})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror or err})") from None
    return sock


class Server(uvicorn.Server):
    """uvicorn's server, calling `on_listen(port)` once its sockets listen (uvicorn's own
    message is not printed for sockets given to it), and, on a graceful shutdown (SIGTERM),
    `on_overdue()` when requests still run after `drain_timeout` seconds: it should end them
    (each answered with an error, its stream closed properly). uvicorn's own timeout, which
    cancels the tasks left mid-write, is the backstop: give it a few seconds more."""

    def __init__(self, config: uvicorn.Config, on_listen, drain_timeout: float, on_overdue):
        super().__init__(config)
        self.on_listen, self.drain_timeout, self.on_overdue = on_listen, drain_timeout, on_overdue

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_listen(self.servers[0].sockets[0].getsockname()[1])

    async def shutdown(self, sockets=None) -> None:
        overdue = asyncio.get_running_loop().call_later(self.drain_timeout, self.on_overdue)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            overdue.cancel()


def connection_class(limits: Limits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the two connection bounds of `limits` (module docstring);
    the per-address counts are shared by the connections of this class."""
    held: collections.Counter = collections.Counter()
    refusal = _refusal(ApiError(429, f"too many connections from this address (at most {limits.per_client}); "
                                "close some and retry", kind="rate_limit_error"))

    class Connection(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._address = self.client[0] if self.client else None
            self._deadline = None
            held[self._address] += 1
            if held[self._address] > limits.per_client:
                transport.write(refusal)
                transport.close()
                return
            self._wait_for_request()

        def connection_lost(self, exc) -> None:
            held[self._address] -= 1
            if held[self._address] <= 0:
                del held[self._address]
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._wait_for_request()

        def _wait_for_request(self) -> None:
            """Close the connection unless a new request's headers arrive in time."""
            if self._deadline is not None:
                self._deadline.cancel()
            answered = self.cycle
            self._deadline = self.loop.call_later(limits.request_timeout, self._late, answered)

        def _late(self, answered) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if self.cycle is answered and idle and not self.transport.is_closing():
                self.transport.close()

    return Connection


class Guard:
    """ASGI wrapper: the API key (every path but /health), then the request body, read here
    within `body_timeout` seconds (408) and `max_body_bytes` (413), and handed to the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout: float):
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        self.expected = None if api_key is None else b"Bearer " + api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] != "/health":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _send(send, ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                                  code="invalid_api_key"))
        limit = self.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await _send(send, ApiError(400, "Content-Length is not a number"))
        if length is not None and int(length) > limit:
            return await _send(send, ApiError(413, f"the request body is over {limit} bytes"))
        try:
            body = await asyncio.wait_for(self._body(receive), self.body_timeout)
        except asyncio.TimeoutError:
            late = ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)")
            return await _send(send, late, close=True)
        if isinstance(body, ApiError):
            return await _send(send, body)
        if body is None:
            return  # the client left
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _body(self, receive) -> bytes | ApiError | None:
        """The whole body; ApiError (413) past the size bound; None if the client left."""
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return ApiError(413, f"the request body is over {self.max_body_bytes} bytes")
        return body


def _refusal(err: ApiError) -> bytes:
    """A whole HTTP/1.1 answer of an error that closes the connection, as bytes (sent before a
    request was read, so not through h11)."""
    payload = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 {err.status} {http.HTTPStatus(err.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n")
    return head.encode() + payload


async def _send(send, err: ApiError, close: bool = False) -> None:
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:  # the rest of the body may still come: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
