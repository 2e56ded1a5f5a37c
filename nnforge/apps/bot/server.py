"""The bot over HTTP: POST /v1/chat and a chat page, on FastAPI + uvicorn, 127.0.0.1 by default.

    nnforge app bot serve runs/bot/example [--port 8000] [--log-conversations chats.jsonl]
    curl -s localhost:8000/v1/chat -H 'content-type: application/json' \
         -d '{"session": "s1", "message": "where is my order?"}'

    POST /v1/chat   {"session": "s1", "message": "..."} -> {"session", "reply", "route", "intent", "confidence",
                    "pending", "ticket", "source", ...}; without a session one is made and returned
    GET  /          the chat page (self-contained: no CDN, no outside requests)
    GET  /health    alive;  GET /ready: 200 once the bot is loaded;  GET /metrics: Prometheus counters
    GET  /v1/bot    the bot's name, intents and thresholds

Every bad request gets a 4xx and a message, never a 500: a body over MAX_BODY_BYTES 413 before it is read, a
message that is empty 400, longer than the limit 413, JSON that is not an object with a text message 400. One
message is understood at a time (the model has the cores to itself); at most MAX_WAITING wait, beyond that 503
with Retry-After, and each waits at most --timeout seconds (504).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
import time
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from nnforge.apps._http import error, json_body
from nnforge.apps.bot.dialogue import Bot, MessageError
from nnforge.apps.bot.page import chat_page
from nnforge.deploy.asgi import BearerAuth, BodyLimit, HostCheck

log = logging.getLogger("nnforge.app.bot")
MAX_BODY_BYTES = 64 * 1024  # a chat message is at most 2,000 characters; JSON and UTF-8 leave room for that
MAX_WAITING = 64
SESSION = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Stats:
    """Counters for /metrics, kept in this process (the bot serves from one)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.routes: Counter = Counter()
        self.status: Counter = Counter()
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe(self, status: int, seconds: float, route: str | None) -> None:
        with self.lock:
            self.status[status] += 1
            if route:
                self.routes[route] += 1
            i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
            self.latency[i] += 1
            self.latency_sum += seconds

    def text(self, sessions: int) -> str:
        with self.lock:
            lines = ["# TYPE nnforge_bot_messages_total counter"]
            lines += [f'nnforge_bot_messages_total{{route="{r}"}} {n}' for r, n in sorted(self.routes.items())]
            lines += ["# TYPE nnforge_bot_requests_total counter"]
            lines += [f'nnforge_bot_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.status.items())]
            lines += ["# TYPE nnforge_bot_chat_seconds histogram"]
            total = 0
            for b, n in zip((*LATENCY_BUCKETS, "+Inf"), self.latency, strict=True):
                total += n
                lines.append(f'nnforge_bot_chat_seconds_bucket{{le="{b}"}} {total}')
            lines += [f"nnforge_bot_chat_seconds_sum {self.latency_sum:.6f}", f"nnforge_bot_chat_seconds_count {total}",
                      "# TYPE nnforge_bot_sessions gauge", f"nnforge_bot_sessions {sessions}"]
        return "\n".join(lines) + "\n"


def create_app(bot: Bot, timeout_s: float = 10.0) -> FastAPI:
    app = FastAPI(title=f"{bot.name} (nnforge bot)", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one message at a time: the sessions and the model are shared
    stats = Stats()
    waiting = 0
    page = chat_page(bot.name, bot.spec.bot["greeting"])

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline';"
                                           " style-src 'unsafe-inline'; connect-src 'self'; img-src data:"})

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        return {"status": "ready", "bot": bot.name}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(stats.text(len(bot.sessions)), media_type="text/plain; version=0.0.4")

    @app.get("/v1/bot")
    def describe():
        return {"name": bot.name, "intents": bot.classes, "threshold": bot.threshold,
                "faq_threshold": bot.faq_threshold if bot.faq is not None else None,
                "calibration": bot.card.get("calibration"), "model": bot.card.get("model_name")}

    def answer(session: str, message: str) -> dict:
        with lock:
            return bot.reply(session, message)

    @app.post("/v1/chat")
    async def chat(request: Request):
        nonlocal waiting
        t0 = time.perf_counter()
        body, bad = await json_body(request, '{"session": "...", "message": "..."}')
        if bad is not None:
            return bad
        if not isinstance(body, dict) or "message" not in body:
            return error(400, 'expected a JSON object {"session": "...", "message": "..."}')
        unknown = sorted(set(body) - {"session", "message"})
        if unknown:
            return error(400, f"unknown field(s) {unknown}; expected session and message")
        session = body.get("session") or secrets.token_urlsafe(12)
        if not isinstance(session, str) or not SESSION.fullmatch(session):
            return error(400, "session must be 1 to 64 letters, digits or _ . : -")
        message = body["message"]
        if waiting >= MAX_WAITING:
            return error(503, f"{waiting} messages are waiting; try again shortly", {"Retry-After": "1"})
        waiting += 1
        try:
            out = await asyncio.wait_for(asyncio.to_thread(answer, session, message), timeout_s)
        except MessageError as err:
            stats.observe(err.status, time.perf_counter() - t0, None)
            return error(err.status, str(err))
        except TimeoutError:
            stats.observe(504, time.perf_counter() - t0, None)
            return error(504, f"no answer within {timeout_s:g} s; try again")
        finally:
            waiting -= 1
        stats.observe(200, time.perf_counter() - t0, out["route"])
        return out

    return app


def serve_bot(folder: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
              log_conversations: str | None = None, tickets: str | None = None, timeout_s: float = 10.0,
              access_log: bool = False) -> None:
    import uvicorn

    from nnforge.deploy.settings import is_loopback

    if not is_loopback(host) and not token:
        raise ValueError(f"binding to {host} exposes the bot beyond this machine; set a token with --token or "
                         "NNFORGE_TOKEN")
    bot = Bot(folder, tickets=tickets, log=log_conversations)
    names = {"localhost", "127.0.0.1", "::1", host.lower()} if is_loopback(host) else None
    app = HostCheck(BearerAuth(BodyLimit(create_app(bot, timeout_s), MAX_BODY_BYTES), token,
                               open_paths=("/health", "/")), names)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("bot %s: http://%s:%d/ (chat page), POST /v1/chat", bot.name, host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=access_log)
    finally:
        bot.close()
