"""The labelling page: the captured inputs one at a time, labelled by click or keyboard, written to the capture store.

    nnforge label captures/ [--port 8001] [--host 127.0.0.1] [--by NAME] [--token T]
    # open http://127.0.0.1:8001/ (with a token: http://HOST:8001/?token=T)

The page shows an item (the image, or the text) with the model's prediction, its top guesses and probabilities and
why it was captured (the model was unsure, or the random sample of all traffic), and one button per class of the
served model. Keys: 1-9 and 0 label with the first ten classes (in the model's order, shown on the buttons), Enter
accepts the model's top guess, s skips, u marks unclear, Backspace or z undoes the last action (the item is new
again), the arrow keys move between items. A filter shows the skipped, unclear or labelled items again. Each label
records who gave it (--by, default the OS user).

Export: "download labels.csv" gives path,label,split with absolute paths (images; `nnforge train image --data
labels.csv` reads it as it is) or text,label,split (texts); GET /api/export?paths=relative gives the paths relative
to the capture folder, for a CSV kept beside items/ or moved with the folder. Import: a CSV in the same layout
(relative paths are read against the capture folder); every row is checked before any label is written, and an
error names the row.

JSON API: GET /api/items?status=new|skipped|unclear|labelled|all, GET /api/item/ID, GET /api/item/ID/content (the
image or text bytes, by id only), POST /api/label {"id": 3, "label": "sneaker"} or {"id": 3, "status":
"skipped|unclear|new"}, GET /api/stats, GET /api/export, POST /api/import (Content-Type: text/csv). Unknown ids are
404, a label outside the model's classes or a bad status 422 (naming what is allowed).

Trust: 127.0.0.1 by default, where the Host header must name the machine (DNS rebinding gets 421); any other
address needs --token (then every /api/ path needs `Authorization: Bearer T`; the page takes the token from its
address and sends it). The page loads nothing from another origin (Content-Security-Policy default-src 'self') and
puts every stored string in with textContent. The writing endpoints take only application/json or text/csv bodies,
which a page on another site cannot send here without the browser asking first (CORS preflight, never granted).
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import secrets
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from nnforge.deploy.asgi import BearerAuth, BodyLimit, HostCheck
from nnforge.deploy.capture import STATUSES, CaptureError, CaptureStore
from nnforge.deploy.settings import is_loopback
from nnforge.loop import _label_page

CSP = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "x-frame-options": "DENY"}
PAGE_PATHS = ("/", "/label.js", "/label.css", "/favicon.svg")  # hold no data: open without the token
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".gif": "image/gif", ".bmp": "image/bmp",
                 ".tif": "image/tiff", ".webp": "image/webp", ".txt": "text/plain; charset=utf-8"}
MAX_IMPORT_BYTES = 64 * 2**20
LIST_LIMIT = 10_000  # items per /api/items answer
# what the page sees of an item: not its file name or path on this machine
PUBLIC = ("id", "kind", "name", "at", "model", "version", "prediction", "confidence", "margin", "top", "reason",
          "status", "label", "labelled_at", "labelled_by")


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry and no $USER
        return "unknown"


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ValueError(f"label: binding to {host} exposes the captured inputs beyond this machine; set a bearer "
                         "token with --token or the NNFORGE_TOKEN environment variable")


class SecurityHeaders:
    """CSP, nosniff, no referrer and no framing on every answer, the errors of the layers inside included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in HEADERS.items() if k.encode() not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _public(store: CaptureStore, item: dict) -> dict:
    out = {k: item.get(k) for k in PUBLIC}
    if item["kind"] == "text":
        out["text"] = store.content(item).decode("utf-8", errors="replace")
    else:
        out["content"] = f"/api/item/{item['id']}/content"
    return out


def _counts(store: CaptureStore) -> dict:
    c = store.counts()
    return {**c, "left": c["new"]}


def export_text(store: CaptureStore, absolute: bool = True) -> str:
    """The store's labels as CSV text (CaptureStore.export_csv's layout); image paths absolute, or relative to the
    capture folder."""
    tmp = store.folder / f".export-{secrets.token_hex(8)}.csv"  # in the folder: paths come out as items/<file>
    try:
        store.export_csv(tmp)
        text = tmp.read_text(encoding="utf-8")
    finally:
        tmp.unlink(missing_ok=True)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not absolute or not rows or rows[0][0] != "path":
        return text
    out = io.StringIO(newline="")
    w = csv.writer(out)
    w.writerow(rows[0])
    for path, *rest in rows[1:]:
        w.writerow([str((store.folder / path).resolve()), *rest])
    return out.getvalue()


def import_text(store: CaptureStore, text: str, name: str, by: str) -> int:
    """Labels from CSV text (relative paths read against the capture folder); errors name `name` and the row."""
    tmp = store.folder / f".import-{secrets.token_hex(8)}.csv"
    try:
        tmp.write_text(text, encoding="utf-8")
        try:
            return store.import_csv(tmp, by=by)
        except CaptureError as err:
            raise CaptureError(str(err).replace(str(tmp), name)) from None
    finally:
        tmp.unlink(missing_ok=True)


def create_app(store: CaptureStore, by: str | None = None, token: str | None = None, host: str = "127.0.0.1"):
    """The labelling page and its API over `store`, as an ASGI app (uvicorn runs it; tests call it in a thread)."""
    check_bind(host, token)
    by = by or default_user()
    app = FastAPI(title="nnforge label", docs_url=None, redoc_url=None, openapi_url=None)

    def item_or_404(item_id: int) -> dict:
        try:
            return store.get(item_id)
        except CaptureError as err:
            raise HTTPException(404, str(err)) from None

    def content_type(request: Request, wanted: str) -> None:
        got = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if got != wanted:
            raise HTTPException(415, f"expected a {wanted} body, got {got or 'no Content-Type'}")

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(_label_page.HTML, headers={"cache-control": "no-store"})

    @app.get("/label.js")
    def script():
        return Response(_label_page.JS, media_type="text/javascript; charset=utf-8")

    @app.get("/label.css")
    def style():
        return Response(_label_page.CSS, media_type="text/css; charset=utf-8")

    @app.get("/favicon.svg")
    def favicon():
        return Response(_label_page.FAVICON, media_type="image/svg+xml")

    @app.get("/api/items")
    def items(status: str = "new", after: int = 0, limit: int = 1000):
        if status not in (*STATUSES, "all"):
            raise HTTPException(422, f"status {status!r}: expected one of {', '.join((*STATUSES, 'all'))}")
        rows = store.items(status=None if status == "all" else status, after=after,
                           limit=max(1, min(limit, LIST_LIMIT)))
        keep = ("id", "kind", "status", "label", "prediction", "confidence", "reason")
        return {"classes": store.classes, "counts": _counts(store),
                "items": [{k: r[k] for k in keep} for r in rows]}

    @app.get("/api/item/{item_id}")
    def item(item_id: int):
        return _public(store, item_or_404(item_id))

    @app.get("/api/item/{item_id}/content")
    def content(item_id: int):
        it = item_or_404(item_id)  # by id only: the file name comes from the store, never from the request
        media = CONTENT_TYPES.get(Path(it["file"]).suffix.lower(), "application/octet-stream")
        try:
            data = store.content(it)
        except FileNotFoundError:
            raise HTTPException(404, f"item {item_id}: its file is gone from the capture folder") from None
        return Response(data, media_type=media, headers={"cache-control": "private, max-age=3600"})

    @app.post("/api/label")
    async def label(request: Request):
        content_type(request, "application/json")
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, RecursionError) as err:
            raise HTTPException(400, f"body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise HTTPException(422, 'expected {"id": ID, "label": CLASS} or {"id": ID, "status": STATUS}')
        item_id, lab = body.get("id"), body.get("label")
        status = body.get("status") or "labelled"
        if not isinstance(item_id, int) or isinstance(item_id, bool):
            raise HTTPException(422, f"id {item_id!r}: expected an item's integer id")
        if status not in STATUSES:
            raise HTTPException(422, f"status {status!r}: expected one of {', '.join(STATUSES)}")
        classes = store.classes
        if status == "labelled" and (not isinstance(lab, str) or not lab or (classes and lab not in classes)):
            raise HTTPException(422, f"label {lab!r} is not one of the model's classes: {', '.join(classes)}")
        item_or_404(item_id)
        try:
            done = await run_in_threadpool(store.set_label, item_id, lab, status, by)
        except CaptureError as err:  # removed in the meantime
            raise HTTPException(404, str(err)) from None
        return {"item": _public(store, done), "counts": _counts(store)}

    @app.get("/api/stats")
    def stats():
        return _counts(store)

    @app.get("/api/export")
    def export(paths: str = "absolute"):
        if paths not in ("absolute", "relative"):
            raise HTTPException(422, f"paths {paths!r}: expected absolute or relative")
        try:
            text = export_text(store, absolute=paths == "absolute")
        except CaptureError as err:
            raise HTTPException(409, str(err)) from None
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="labels.csv"',
                                 "cache-control": "no-store"})

    @app.post("/api/import")
    async def import_(request: Request, name: str = "labels.csv"):
        content_type(request, "text/csv")
        try:
            text = (await request.body()).decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise HTTPException(400, f"{name}: not UTF-8 text ({err})") from None
        try:
            n = await run_in_threadpool(import_text, store, text, name, by)
        except CaptureError as err:
            raise HTTPException(400, str(err)) from None
        except (csv.Error, KeyError) as err:
            raise HTTPException(400, f"{name}: not a readable CSV ({err})") from None
        return {"imported": n, "counts": _counts(store)}

    # outermost first: every answer gets the headers; Host and token are checked before a body is read
    allowed = {"localhost", "127.0.0.1", "::1", host.lower()} if is_loopback(host) else None  # as `serve` does
    guarded = HostCheck(BearerAuth(BodyLimit(app, MAX_IMPORT_BYTES), token, open_paths=PAGE_PATHS), allowed)
    return SecurityHeaders(guarded)


def page_url(host: str, port: int, token: str | None = None) -> str:
    name = f"[{host}]" if ":" in host else host
    return f"http://{name}:{port}/" + (f"?token={token}" if token else "")


def run(folder: str | Path, host: str = "127.0.0.1", port: int = 8001, by: str | None = None,
        token: str | None = None, say=print) -> None:
    """Serve the labelling page over the capture folder until Ctrl-C."""
    import uvicorn

    token = token or os.environ.get("NNFORGE_TOKEN")
    check_bind(host, token)
    store = CaptureStore(folder)
    app = create_app(store, by=by, token=token, host=host)
    c = store.counts()
    say(f"labelling {store.folder}: {c['new']} new of {c['total']} captured; open {page_url(host, port, token)}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
