"""The monitor's own HTTP endpoint (`--stream http`): items are POSTed to it, the dashboard is served at /.

    nnforge app monitor --model runs/text/sentiment --stream http --port 8010 [--clock wall]
    curl -s localhost:8010/v1/items -H 'content-type: application/json' \
         -d '{"items": [{"text": "Airline shares slump", "time": "2020-03-09T10:00:00Z"}]}'

    POST /v1/items   {"items": [{"text", "time" (ISO 8601 or Unix seconds; optional with --clock wall), "id"}]}
                     -> {"accepted", "duplicates", "late", "alerts": [...]}; a single {"text", ...} works too
    GET  /           the dashboard (reloads itself every 10 s)
    GET  /v1/alerts  the latest alerts (?limit=50);  GET /v1/stats: counters;  GET /health, /ready

Bad requests get a 4xx with a message that names the item and the field: at most MAX_ITEMS items, texts of at most
MAX_TEXT characters, a body of at most MAX_BODY_BYTES (413 before it is read). Items are processed one request at
a time, in a worker thread, while the server keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse

from nnforge.apps._http import error, json_body
from nnforge.apps.monitor.dashboard import render
from nnforge.apps.monitor.monitor import Monitor
from nnforge.apps.monitor.streams import Columns, item_from_json
from nnforge.deploy.asgi import BearerAuth, BodyLimit, HostCheck

log = logging.getLogger("nnforge.app.monitor")
MAX_ITEMS = 1000
MAX_TEXT = 5000
MAX_BODY_BYTES = 4 * 2**20


def create_app(monitor: Monitor, lock: threading.Lock) -> FastAPI:
    app = FastAPI(title="nnforge monitor", docs_url=None, redoc_url=None)
    now = time.time if monitor.clock == "wall" else None  # items without a time arrive "now"

    @app.get("/", response_class=HTMLResponse)
    def dashboard():
        return HTMLResponse(render(monitor.state.path, refresh_s=10))

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        return {"status": "ready"}

    @app.get("/v1/alerts")
    def alerts(limit: int = Query(50, ge=1, le=1000)):
        with lock:
            return {"alerts": monitor.state.alerts(limit)}

    @app.get("/v1/stats")
    def stats():
        with lock:
            st = monitor.state
            return {k: int(st.meta(k) or 0) for k in ("items", "duplicates", "late", "future")} | {
                "watermark": st.watermark, "judged_until": st.judged_until, "alerts_sent": monitor.sinks.sent}

    def process(items):
        with lock:
            before = (monitor.duplicates, monitor.late, monitor.future)
            raised = monitor.process(items)
            return {"accepted": len(items) - (monitor.duplicates - before[0]) - (monitor.late - before[1])
                    - (monitor.future - before[2]), "duplicates": monitor.duplicates - before[0],
                    "late": monitor.late - before[1], "future": monitor.future - before[2], "alerts": raised}

    @app.post("/v1/items")
    async def post_items(request: Request):
        body, bad = await json_body(request, '{"items": [...]}')
        if bad is not None:
            return bad
        raw = body.get("items") if isinstance(body, dict) and "items" in body else [body]
        if not isinstance(raw, list) or not raw:
            return error(400, 'expected {"items": [{"text": ..., "time": ...}, ...]} with at least one item')
        if len(raw) > MAX_ITEMS:
            return error(413, f"{len(raw)} items in one request; the limit is {MAX_ITEMS}")
        items, cols = [], Columns()
        for i, row in enumerate(raw):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                return error(400, f'items[{i}]: expected an object with a "text" string')
            unknown = sorted(set(row) - {"text", "time", "id"})
            if unknown:
                return error(400, f"items[{i}]: unknown field(s) {unknown}; expected text, time, id")
            if len(row["text"]) > MAX_TEXT:
                return error(413, f"items[{i}].text is {len(row['text'])} characters; the limit is {MAX_TEXT}")
            if "time" not in row and now is None:
                return error(400, f'items[{i}]: no "time"; give one (ISO 8601 or Unix seconds) or run the monitor '
                                   "with --clock wall")
            item = item_from_json(row, cols, f"items[{i}]", now)
            if item is None:
                return error(400, cols.problems[-1] if cols.problems else f"items[{i}]: unusable")
            items.append(item)
        return await asyncio.to_thread(process, items)

    return app


def serve_monitor(monitor: Monitor, host: str, port: int, token: str | None, stop: threading.Event) -> None:
    import uvicorn

    from nnforge.deploy.settings import is_loopback

    if not is_loopback(host) and not token:
        raise ValueError(f"binding to {host} lets anyone post items; set a token with --token or NNFORGE_TOKEN")
    lock = threading.Lock()
    names = {"localhost", "127.0.0.1", "::1", host.lower()} if is_loopback(host) else None
    app = HostCheck(BearerAuth(BodyLimit(create_app(monitor, lock), MAX_BODY_BYTES), token,
                               open_paths=("/health",)), names)

    def ticker():  # --clock wall: windows close on time even when no item comes
        while not stop.wait(1.0):
            with lock:
                monitor.tick()

    if monitor.clock == "wall":
        threading.Thread(target=ticker, daemon=True, name="ticker").start()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("monitor: POST http://%s:%d/v1/items; dashboard at http://%s:%d/", host, port, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    stop.set()
