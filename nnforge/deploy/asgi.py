"""Pure ASGI layers in front of the FastAPI app: they answer before the app (or the body) is ever reached.

    app = Metrics(BearerAuth(BodyLimit(fastapi_app, 16 * 2**20), token), ServerMetrics(), routes)

Pure ASGI rather than Starlette middleware because the body limit must see the body as it streams in (a
BaseHTTPMiddleware only sees a request once it is complete), and because what these send is final: an
exception raised inside the app would be turned into a 500 by Starlette before anything outside could act.
"""

from __future__ import annotations

import hmac
import json
import time

from nnforge.deploy.prom import ServerMetrics


async def _send_json(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class BodyLimit:
    """413 for a body over max_bytes: from Content-Length before reading, or while counting a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body over the limit of {self.max_bytes} bytes ({self.max_bytes / 2**20:.1f} MiB)"
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await _send_json(send, 400, f"Content-Length {length!r} is not a number")
            if int(length) > self.max_bytes:
                return await _send_json(send, 413, too_big + f"; Content-Length says {int(length)}")
        seen, started, refused = 0, False, False

        async def counting_receive():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if not started and not refused:
                        refused = True
                        await _send_json(send, 413, too_big)
                    return {"type": "http.disconnect"}  # the app stops reading; its own reply is dropped below
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


def host_name(value: str) -> str:
    """The name part of a Host header: "localhost:8000" -> "localhost", "[::1]:8000" -> "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostCheck:
    """421 for a Host header that is not one of `allowed`: a page on another site that points a name it controls at
    127.0.0.1 (DNS rebinding) must not reach a loopback server that trusts the machine. `allowed` None: any host."""

    def __init__(self, app, allowed: set[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            host = host_name(_header(scope, b"host") or "")
            if host not in self.allowed:
                names = ", ".join(sorted(self.allowed))
                return await _send_json(send, 421, f"Host {host!r} is not served here; expected one of {names} "
                                                   "(add names with --allowed-hosts)")
        await self.app(scope, receive, send)


class BearerAuth:
    """Every path except /health needs `Authorization: Bearer <token>` when a token is set."""

    def __init__(self, app, token: str | None, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.token, self.open_paths = app, (token or "").encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.token and scope["path"] not in self.open_paths:
            given = (_header(scope, b"authorization") or "").encode("latin-1")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                what = "wrong bearer token" if given else "missing bearer token (Authorization: Bearer <token>)"
                return await _send_json(send, 401, what, {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class Metrics:
    """Requests by path and status, latency histogram, errors by status, requests in flight; scraped at /metrics."""

    def __init__(self, app, metrics: ServerMetrics, routes: tuple[str, ...]):
        # paths outside `routes` share the label "other": a scanner's made-up paths cannot blow up the series
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.metrics
        m.in_flight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            m.in_flight.dec()
            path = scope["path"] if scope["path"] in self.routes else "other"
            m.requests.labels(path, str(status)).inc()
            m.latency.labels(path).observe(time.perf_counter() - t0)
            if status >= 400:
                m.errors.labels(str(status)).inc()
