"""The HTTP server: FastAPI + uvicorn, micro-batched, with limits that turn every bad request into a 4xx.

    nnforge serve runs/image/exp1 [--host 127.0.0.1] [--port 8000] [--workers N] [--token T] [--allow-reload]
    nnforge serve shoes@champion --capture captures/      # a registry alias, followed as it moves; capture on
    curl -F file=@shoe.png http://127.0.0.1:8000/v1/predict

Endpoints: POST /v1/predict (images as multipart files, JSON {"images": [base64, ...]} or one raw image body;
texts as JSON {"texts": [...]}), GET /health (alive, never needs the token), GET /ready (503 until the model is
loaded and warmed), GET /metrics (Prometheus, summed over all workers: prom.py), GET /v1/model, POST /v1/reload,
GET /docs (OpenAPI).

POST /v1/reload swaps the served model, so it is guarded: with a token it needs the token like every other path;
without one it is refused (403) unless the server was started with --allow-reload (ServeSettings.allow_reload),
because on a server without a token anyone who can reach the port could replace the model.

Answers name the model, the version (the served file's hash) and the run folder's name. After a classifier's
answer (on the request path, cheap): its top probability and class are counted on /metrics and added to the
worker's drift window (drift.py: PSI against RUN/eval/reference.json, as gauges and in /v1/model), and with
--capture the capture picks the inputs to keep and queues them for its writer thread (capture.py); none of it can
fail the answer. With ServeSettings.follow (`nnforge serve NAME@ALIAS`) each worker looks at the alias's pointer
file every second and, when it names another run, swaps that run in the way POST /v1/reload does (the same lock
and code; counted as nnforge_reloads_total{result="followed"}). A pointer that is missing or invalid is logged and
the model served keeps serving; a POST /v1/reload to another run is undone at the next look, since the alias wins.

Requests pass three pure ASGI layers (asgi.py) before FastAPI: metrics (outermost, so it sees every status), the
bearer token, and the body limit, which refuses a too-large Content-Length before reading any of the body and
counts the bytes of a chunked body as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import importlib.util
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from nnforge.data.inputs import InputError, InputKind, TooManyInputs, input_kind
from nnforge.deploy.apidocs import api_reference_html
from nnforge.deploy.artifacts import run_io
from nnforge.deploy.asgi import BearerAuth, BodyLimit, HostCheck, Metrics
from nnforge.deploy.batching import MicroBatcher, QueueFull
from nnforge.deploy.capture import Capturer
from nnforge.deploy.drift import SIGNALS, DriftWindow
from nnforge.deploy.engine import Engine, load_engine
from nnforge.deploy.prom import CONTENT_TYPE, MAX_CLASS_LABELS, MULTIPROC_ENV, ServerMetrics, multiprocess_mode
from nnforge.deploy.settings import ServeSettings, allowed_host_names, default_threads, reload_root
from nnforge.evaluation.drift import read_reference
from nnforge.outputs import Probs

log = logging.getLogger("nnforge.serve")
SETTINGS_ENV = "NNFORGE_SERVE_SETTINGS"  # how `--workers N` hands the settings to each worker process
# Inputs this small decode in well under a millisecond, cheaper than a hop to a thread; bigger ones (a photo can take
# 50 ms) decode on a thread, so that one large upload never stalls the event loop and everyone else's requests.
INLINE_DECODE_BYTES = 64 * 1024
RELOAD_OFF = ("reloading is off: this server has no token, so anyone who can reach it could swap the model; "
              "restart it with --token (reloads then need the token) or with --allow-reload")
# The verbs a run may answer (its io "verb"): one route each, the same handler; a run answers its own verb only.
VERBS = {"predict": "Answers for one or more inputs (classifiers: top-k labels with probabilities)",
         "generate": "New samples from a generator", "act": "A policy's action for an observation",
         "recommend": "Ranked items for a user or a history"}
ROUTES = (*(f"/v1/{v}" for v in VERBS), "/v1/reload", "/v1/model", "/health", "/ready", "/metrics", "/docs",
          "/openapi.json")
CAPTURE_KINDS = ("image", "text")  # the inputs a capture store keeps as they arrived (bytes, UTF-8 text)
FOLLOW_EVERY_S = 1.0  # how often a server following an alias looks at its pointer file
PUBLISH_EVERY_S = 0.5  # how often the drift gauges and the capture drop count are brought up to date


# ---------------------------------------------------------------------------------------------------------------
# reading requests


class Reject(Exception):
    """A request we answer with a 4xx (or 503/504) and a message."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


async def read_inputs(request: Request, pre: InputKind, max_inputs: int) -> list[tuple[str, bytes | str]]:
    """(name, raw input) pairs from any body the model's input kind accepts; Reject with the reason otherwise."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    key = pre.json_key
    accepted = ", ".join((["multipart/form-data"] if pre.multipart else []) + [f"application/json {{\"{key}\": [...]}}"]
                         + [t + ("*" if t.endswith("/") else "") for t in pre.body_types])
    if ctype == "multipart/form-data" and pre.multipart:
        form = await request.form(max_files=max_inputs, max_fields=max_inputs)
        try:
            items = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        finally:
            await form.close()
        if not items:
            raise Reject(400, "the form holds no files; send each input as a file field (curl -F file=@x.png)")
    elif ctype == "application/json":
        body = await request.body()
        if not body:
            raise Reject(400, f"empty body; expected JSON {{\"{key}\": [...]}}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise Reject(400, f"body is not valid JSON ({err})") from None
        except RecursionError:
            raise Reject(400, "body is JSON nested too deeply") from None
        try:
            items = pre.read_json(data, max_inputs)
        except TooManyInputs as err:
            raise Reject(413, str(err)) from None
        except InputError as err:
            raise Reject(400, str(err)) from None
    elif any(ctype.startswith(t) if t.endswith("/") else ctype == t for t in pre.body_types):
        body = await request.body()
        if ctype.startswith("text/"):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError:
                raise Reject(400, f"{ctype} body is not UTF-8") from None
        items = [("body", body)]
    elif not ctype:
        raise Reject(415, f"no Content-Type; send {accepted}")
    else:
        raise Reject(415, f"Content-Type {ctype} is not accepted by this {pre.name} model; send {accepted}")
    if len(items) > max_inputs:
        raise Reject(413, f"{len(items)} inputs in one request; the limit is {max_inputs}")
    for name, raw in items:
        if isinstance(raw, bytes | str) and len(raw) == 0:
            raise Reject(400, "empty body" if name == "body" else f"{name}: empty")
    return items


def preprocess(engine: Engine, items: list[tuple[str, bytes | str]]) -> list[np.ndarray]:
    arrays = []
    for name, raw in items:
        try:
            arrays.append(engine.input.decode(raw))
        except InputError as err:
            raise Reject(400, f"{name}: {err}") from None
        except Exception as err:  # a decoder failing in a way nobody foresaw: still the input's fault, not a 500
            log.warning("%s: unexpected %s while decoding", name, type(err).__name__, exc_info=True)
            raise Reject(400, f"{name}: could not be decoded ({type(err).__name__}: {err})") from None
    return arrays


# ---------------------------------------------------------------------------------------------------------------
# the app


class Prediction(BaseModel):
    input: str
    labels: list[str]
    probs: list[float]


class PredictResponse(BaseModel):
    model: str
    version: str
    run: str
    """The served run folder's name: tells a champion's answers from a challenger's."""
    backend: str
    predictions: list[Prediction]


class ReloadRequest(BaseModel):
    run: str | None = None
    """Run folder to serve from now on; default: the one being served (after re-training or re-exporting)."""
    backend: Literal["auto", "onnx", "torch"] | None = None


_JSON_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}


class _CountingCapturer(Capturer):
    """The capture of this worker: what it chooses to keep is counted by reason on /metrics."""

    def __init__(self, counter, folder: str, **options):
        self.counter = counter
        super().__init__(folder, **options)

    def choose(self, probs: np.ndarray) -> list[tuple[int, str]]:
        chosen = super().choose(probs)
        for _, reason in chosen:
            self.counter.labels(reason).inc()
        return chosen


class _State:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.engine: Engine | None = None
        self.error: str | None = None
        self.generation = 0  # reloads seen, shared between workers through settings.sync_file
        self.reload_lock = asyncio.Lock()
        self.metrics = m = ServerMetrics()
        m.ready.set(0)
        m.pending.set(0)
        self.capturer: Capturer | None = None  # started by the app's lifespan when settings.capture is set
        self.drift = DriftWindow()
        self._class_counters: list = []  # nnforge_predictions_total's series for the served model's classes
        self._drift_changes = -1  # the drift window's change count last published
        self._drift_shown: set[str] = set()  # gauges this worker has set (signals, and "window")
        self._dropped_seen = 0  # the capturer's drops already counted
        self._answer_failed = False
        self.predicting = 0  # /v1/predict requests being handled
        self.batcher = MicroBatcher(settings.max_batch_size, settings.max_wait_ms, settings.max_queue,
                                    on_batch=self._on_batch, on_pending=m.pending.set,
                                    arriving=lambda: self.predicting - self.batcher.requests_in)

    def _on_batch(self, waits: list[float], seconds: float) -> None:
        m = self.metrics
        m.batch_size.observe(len(waits))
        m.inference.observe(seconds)
        for w in waits:
            m.queue_wait.observe(w)

    def use(self, engine: Engine) -> None:
        """Answer from `engine` from now on: one reference swap, each request already holds the engine it began with."""
        reference = None
        if isinstance(engine.output, Probs):
            try:
                reference = read_reference(engine.run)
            except ValueError as err:
                log.warning("no drift scores: %s", err)
            if reference is None:
                log.info("no drift scores: %s has no eval/reference.json (run `nnforge evaluate` on it)", engine.run)
            self._class_counters = self._counters_for(engine)
        self.drift.reset(reference, engine.output.classes if reference else [])
        self.engine = engine
        self.metrics.serving(engine.name, engine.version, engine.backend)

    async def swap(self, run: str, backend: str, result: str) -> tuple[Engine | None, Engine]:
        """Load and warm `run` on a thread, then serve it: what a reload, a reload another worker made and a moved
        alias all do. The caller holds reload_lock; a load that fails raises, and the old model keeps serving."""
        old = self.engine
        new = await asyncio.to_thread(self.load, run, backend)
        self.use(new)
        self.metrics.reloads.labels(result).inc()
        return old, new

    def _counters_for(self, engine: Engine) -> list:
        """One series per class, the classes past MAX_CLASS_LABELS sharing the last one ("other")."""
        classes = engine.output.classes
        named = classes[:MAX_CLASS_LABELS] + (["other"] if len(classes) > MAX_CLASS_LABELS else [])
        return [self.metrics.predicted.labels(c) for c in named]

    def answered(self, engine: Engine, items: list[tuple[str, bytes | str]], probs: np.ndarray) -> None:
        """After a classifier's answer: the served distribution, the drift window and the capture. Cheap (the
        capture only queues), and it never fails the request that has been answered."""
        try:
            m = self.metrics
            counters = self._class_counters if engine is self.engine else self._counters_for(engine)
            for p, c in zip(probs.max(1).tolist(), probs.argmax(1).tolist(), strict=True):
                m.confidence.observe(p)
                counters[min(c, len(counters) - 1)].inc()
            if engine is self.engine:  # an answer of the model before a reload says nothing about this one's drift
                self.drift.observe(probs)
            if self.capturer is not None and engine.kind in CAPTURE_KINDS:
                self.capturer.offer(items, probs, engine.output.classes,
                                    {"model": engine.name, "version": engine.version, "run": str(engine.run)})
        except Exception:  # noqa: BLE001 - bookkeeping after the answer: logged once, never the client's problem
            if not self._answer_failed:
                self._answer_failed = True
                log.exception("recording an answer for drift and capture failed (logged once)")

    def publish(self) -> None:
        """Bring the drift gauges and the capture's drop count up to date (prom.py: a gauge is set where its value
        lives, in this worker). A signal without a score (too few answers since a reload) reads NaN."""
        if self.capturer is not None and self.capturer.dropped > self._dropped_seen:
            self.metrics.capture_dropped.inc(self.capturer.dropped - self._dropped_seen)
            self._dropped_seen = self.capturer.dropped
        if self.drift.changes == self._drift_changes:
            return
        self._drift_changes = self.drift.changes
        scores = self.drift.psi()
        if self.drift.reference is not None or "window" in self._drift_shown:
            self.metrics.drift_window.set(len(self.drift.answers))
            self._drift_shown.add("window")
        for name in SIGNALS:
            if name in scores:
                self.metrics.drift_psi.labels(name).set(scores[name])
                self._drift_shown.add(name)
            elif name in self._drift_shown:
                self.metrics.drift_psi.labels(name).set(math.nan)

    def load(self, run: str, backend: str) -> Engine:
        """Load and warm a model (on a worker thread); nothing is served from it until it is complete."""
        s = self.settings
        engine = load_engine(run, backend, s.int8 and backend != "torch", s.device, s.threads)
        engine.warm(s.max_batch_size)
        if hasattr(engine.input, "max_pixels"):  # image inputs: refuse a picture too large before decoding it
            engine.input.max_pixels = s.max_pixels
        return engine


def _freeze_heap() -> None:
    """Exclude everything alive now (the libraries, the model) from the garbage collector's full passes.

    With torch, FastAPI and ONNX Runtime imported a full collection walks some 200k objects: 50-150 ms during
    which no request moves, the p99 of a busy server. Frozen objects are still freed by reference counting, but
    cycles among them never are: after a reload the heap is unfrozen first, so the replaced model (frozen with
    everything else at start-up) is collected rather than kept for good (the soak grew 3-7 MB per reload before),
    and freed memory goes back to the system (malloc_trim), not only to the allocator.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _trim_malloc()


def _trim_malloc() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class _GcWatch:
    """Garbage-collector pauses as they happen, for _watch_pauses to record.

    The callback runs inside the collector, on whichever thread happened to allocate, possibly while that thread
    holds the metrics' lock: it only appends to a bounded deque, and the event loop records them later.
    """

    def __init__(self):
        self.pauses: deque[tuple[int, float]] = deque(maxlen=10_000)  # (generation, seconds)
        self._started = 0.0
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def close(self) -> None:
        gc.callbacks.remove(self.callback)


async def _watch_pauses(metrics: ServerMetrics, gc_watch: _GcWatch, every_s: float = 0.1) -> None:
    """Every `every_s`: how late the event loop woke up (every request waiting on the loop was as late), and the
    collector's pauses since the last time."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(every_s)
        metrics.loop_lag.observe(max(0.0, loop.time() - t - every_s))
        while gc_watch.pauses:
            generation, seconds = gc_watch.pauses.popleft()
            metrics.gc_pause.labels(str(generation)).observe(seconds)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(settings: ServeSettings, on_fatal=None):
    """The ASGI app for `settings`; the model loads in the background after startup (see /ready).

    on_fatal(message) is called when the first load fails (the single-process server then exits with it).
    """
    settings.check()
    state = _State(settings)
    io = run_io(settings.run)

    async def first_load():
        try:
            state.use(await asyncio.to_thread(state.load, settings.run, settings.backend))
        except Exception as err:  # anything a broken run folder raises: reported, never served
            state.error = f"{type(err).__name__}: {err}"
            log.error("could not load %s: %s", settings.run, state.error)
            if on_fatal:
                on_fatal(state.error)
            return
        e = state.engine
        _freeze_heap()
        log.info("ready: %s %s (%s, version %s) loaded and warmed in %.2fs", e.kind, e.name, e.backend,
                 e.version, e.load_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if settings.capture:  # one per worker; several workers share the store (SQLite, short transactions)
            state.capturer = _CountingCapturer(
                state.metrics.captured, settings.capture, threshold=settings.capture_threshold,
                margin=settings.capture_margin, sample=settings.capture_sample, max_mb=settings.capture_max_mb)
            log.info("capturing inputs with top probability < %g or margin < %g, plus %g of the rest, in %s "
                     "(at most %g MB)", settings.capture_threshold, settings.capture_margin,
                     settings.capture_sample, settings.capture, settings.capture_max_mb)
        await state.batcher.start()
        gc_watch = _GcWatch()
        tasks = [asyncio.create_task(first_load()), asyncio.create_task(_watch_pauses(state.metrics, gc_watch)),
                 asyncio.create_task(_publish(state))]
        if settings.sync_file:
            tasks.append(asyncio.create_task(_follow_reloads(state)))
        if settings.follow:
            tasks.append(asyncio.create_task(_follow_pointer(state)))
        yield
        for t in tasks:
            t.cancel()
        gc_watch.close()
        await state.batcher.stop()
        if state.capturer is not None:  # what is queued is written before the process exits
            await asyncio.to_thread(state.capturer.close)
            state.publish()
        state.metrics.close()

    app = FastAPI(title="nnforge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Predictions from an nnforge run. Every endpoint but /health needs the bearer "
                              "token when the server was started with one.")
    app.state.nnforge = state

    @app.get("/docs", include_in_schema=False)
    async def docs():  # a self-contained page: Swagger UI's CDN scripts would leave it blank offline
        return HTMLResponse(api_reference_html(app.openapi()))

    @app.get("/health", summary="The process is alive (no token needed)")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="200 once the model is loaded and warmed, 503 before",
             responses={503: {"description": "loading, or the model failed to load"}})
    async def ready():
        if state.engine is None:
            return _error(503, state.error or "loading the model", {"Retry-After": "1"})
        return {"ready": True, "model": state.engine.name, "version": state.engine.version}

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/model", summary="Name, version, classes and input spec of the served model")
    async def model():
        if state.engine is None:
            return _error(503, state.error or "loading the model", {"Retry-After": "1"})
        limits = ("max_batch_size", "max_wait_ms", "max_queue", "timeout_s", "max_inputs", "max_pixels")
        out = state.engine.describe() | {"worker_pid": os.getpid(), "reloads": state.generation,
                                         "limits": {k: getattr(settings, k) for k in limits},
                                         "capture": state.capturer is not None, "following": bool(settings.follow)}
        if isinstance(state.engine.output, Probs):
            out["drift"] = state.drift.scores()  # this worker's window
        return out

    async def answer(verb: str, request: Request, top_k: int | None):
        engine = state.engine  # one engine per request, even if a reload swaps it meanwhile
        if engine is None:
            return _error(503, state.error or "loading the model", {"Retry-After": "1"})
        if engine.verb != verb:
            return _error(404, f"this run answers POST /v1/{engine.verb}, not /v1/{verb}")
        state.predicting += 1
        try:
            async with asyncio.timeout(settings.timeout_s):
                items = await read_inputs(request, engine.input, settings.max_inputs)
                if sum(len(raw) for _, raw in items if isinstance(raw, bytes | str)) > INLINE_DECODE_BYTES:
                    arrays = await asyncio.to_thread(preprocess, engine, items)
                else:
                    arrays = preprocess(engine, items)
                outputs = await state.batcher.submit(engine, arrays)
        except Reject as r:
            return _error(r.status, r.detail, r.headers)
        except QueueFull as err:
            return _error(503, f"server busy: {err}; retry shortly", {"Retry-After": "1"})
        except TimeoutError:
            return _error(504, f"no answer within {settings.timeout_s:g}s; the server is overloaded")
        except ClientDisconnect:
            return _error(400, "the client went away before sending the whole body")
        finally:
            state.predicting -= 1
        asked = {"inputs": arrays} if engine.output.takes_inputs else {}  # answers that depend on the question
        values = engine.output.finish(outputs)
        rows = engine.output.rows([name for name, _ in items], values, top_k=top_k or settings.top_k, **asked)
        if isinstance(engine.output, Probs):
            state.answered(engine, items, values)
        # a JSONResponse as is: FastAPI's encoder would walk every float again (a fifth of a small request's cost)
        try:
            return JSONResponse({"model": engine.name, "version": engine.version, "run": engine.run.name,
                                 "backend": engine.backend, engine.output.response_key: rows})
        except ValueError:  # JSON has no NaN or infinity: inputs far outside what the model saw in training
            return _error(422, "the model's answer for this input is not a finite number (NaN or infinity); the "
                               "input is far outside the range the model was trained on")

    answers = {200: {"description": "one answer per input, under the output kind's key (predictions, ...)"},
               400: {"description": "an input that cannot be read"},
               404: {"description": "the run answers another verb"},
               413: {"description": "body, input count or image too large"},
               415: {"description": "unaccepted Content-Type"},
               422: {"description": "the model's answer is not finite (NaN or infinity) for this input"},
               503: {"description": "not ready, or the queue is full (see Retry-After)"},
               504: {"description": "no answer within the request timeout"}}

    def route(verb: str):
        async def handler(request: Request, top_k: int | None = Query(None, ge=1, le=1000)):
            return await answer(verb, request, top_k)

        # the served run's own input kind says what its verb's body may be (the schema is that of the run the server
        # started with; a reload to a run of another kind does not rewrite it)
        served = io if io and io.get("verb", "predict") == verb else None
        content = (input_kind(served["input"]["kind"]).openapi_content(served["input"], settings.max_inputs)
                   if served else None)
        extra = {"requestBody": {"required": True, "content": content}} if content else _JSON_BODY
        classifier = served is not None and served["output"].get("kind") == "probs"
        responses = {**answers, 200: {"model": PredictResponse}} if classifier else answers
        app.post(f"/v1/{verb}", summary=VERBS[verb], openapi_extra=extra, responses=responses,
                 name=verb)(handler)

    for verb in VERBS:
        route(verb)

    root = reload_root(settings)

    @app.post("/v1/reload", summary="Load a model fully, warm it, then swap it in atomically",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "properties": {"run": {"type": "string"},
                                                   "backend": {"enum": ["auto", "onnx", "torch"]}}}}}}},
              responses={400: {"description": "the body is not a JSON object of run and backend"},
                         403: {"description": "reloading is off (no token, no --allow-reload), or the run is "
                                              "outside the folder reloads may load from"},
                         409: {"description": "a reload is already running"},
                         415: {"description": "the body is not application/json"},
                         422: {"description": "the new model failed to load; the old one keeps serving"}})
    async def reload(request: Request):
        if not settings.token and not settings.allow_reload:  # with a token, BearerAuth has checked it already
            return _error(403, RELOAD_OFF)
        # JSON only: a page on another site can send a plain form or text POST without asking, not JSON
        if (request.headers.get("content-type") or "").split(";")[0].strip().lower() != "application/json":
            return _error(415, 'send a JSON body, e.g. {} or {"run": "runs/image/exp2", "backend": "onnx"}')
        try:
            req = ReloadRequest(**json.loads(await request.body() or b"{}"))
        except (ValueError, TypeError, RecursionError) as err:
            return _error(400, f"expected a JSON object with optional run and backend ({type(err).__name__})")
        if state.reload_lock.locked():
            return _error(409, "a reload is already running; try again when it has finished")
        async with state.reload_lock:
            old = state.engine
            run = req.run or (str(old.run) if old else settings.run)
            resolved = Path(run).resolve()
            if resolved != Path(settings.run).resolve() and not resolved.is_relative_to(root):
                state.metrics.reloads.labels("refused").inc()
                log.warning("reload refused: %s is outside %s", run, root)
                return _error(403, f"reloads load runs under {root} only (set with --reload-root)")
            try:
                old, new = await state.swap(str(resolved), req.backend or settings.backend, "ok")
            except Exception as err:  # a bad folder must not take the server down; the caller learns no paths
                state.metrics.reloads.labels("failed").inc()
                log.error("reload of %s failed: %s: %s", run, type(err).__name__, err)
                still = f"still serving version {old.version}" if old else "no model is being served"
                return _error(422, f"reload failed ({type(err).__name__}; the server log has the details); {still}")
            _announce_reload(state, run, req.backend or settings.backend)
        previous = old.version if old else None
        del old  # the replaced model goes with the next collection
        _freeze_heap()
        log.info("reloaded: %s %s version %s (was %s) in %.2fs", new.name, new.backend, new.version,
                 previous, new.load_seconds)
        return {"model": new.name, "version": new.version, "run": new.run.name, "backend": new.backend,
                "previous_version": previous, "load_seconds": round(new.load_seconds, 3)}

    # outermost first: metrics see every answer; the Host and the token are checked before anything reads the body
    limited = BodyLimit(app, int(settings.max_body_mb * 2**20))
    guarded = HostCheck(BearerAuth(limited, settings.token), allowed_host_names(settings))
    return Metrics(guarded, state.metrics, ROUTES)


# ---------------------------------------------------------------------------------------------------------------
# several workers: a reload in one process is followed by the others through a small JSON file


def _read_news(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _announce_reload(state: _State, run: str, backend: str) -> None:
    if not state.settings.sync_file:
        state.generation += 1
        return
    p = Path(state.settings.sync_file)
    # past every generation announced so far, so that the other workers follow this reload, not an older one
    state.generation = max(state.generation, _read_news(p).get("generation", 0)) + 1
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"generation": state.generation, "run": run, "backend": backend}))
    tmp.replace(p)


async def _follow_reloads(state: _State, every_s: float = 0.5) -> None:
    p = Path(state.settings.sync_file)
    while True:
        await asyncio.sleep(every_s)
        news = _read_news(p)
        if news.get("generation", 0) <= state.generation or state.reload_lock.locked():
            continue
        async with state.reload_lock:
            try:
                _, new = await state.swap(news["run"], news["backend"], "ok")
            except Exception as err:
                log.error("following a reload of %s failed: %s", news.get("run"), err)
                state.generation = news["generation"]  # do not retry a broken folder every half second
                continue
            state.generation = news["generation"]
            log.info("followed a reload: %s version %s", new.name, new.version)
        _freeze_heap()


# ---------------------------------------------------------------------------------------------------------------
# following an alias: a registry's pointer file names the run to serve


def read_pointer(path: Path) -> Path:
    """The run an alias pointer file names ({"name", "alias", "version", "run"}, as loop/registry.py writes it)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("run"), str) or not data["run"]:
        raise ValueError('expected a JSON object with a "run" folder')
    return Path(data["run"]).resolve()


async def _follow_pointer(state: _State, every_s: float = FOLLOW_EVERY_S) -> None:
    """Serve the run the pointer file names: when it names another run than the one served, load and warm that
    run and swap it in as POST /v1/reload does (the same lock; requests in flight finish on the model they began
    with). Each worker follows the file by itself. A look costs a stat; the file is read only when its inode, time
    or size changed. A missing or invalid file, or a run that fails to load, is logged once and the model served
    keeps serving; a failed run is tried again when the file changes."""
    path = Path(state.settings.follow)
    seen: tuple | None = None  # (inode, mtime, size) of the file last read
    target: Path | None = None  # the run it names
    failed: Path | None = None
    said = ""  # the last problem logged: a lasting one is logged once

    def problem(message: str) -> None:
        nonlocal said
        if message != said:
            served = state.engine.run if state.engine else state.settings.run
            log.warning("following %s: %s; still serving %s", path, message, served)
            said = message

    while True:
        await asyncio.sleep(every_s)
        try:
            st = path.stat()
        except OSError as err:
            seen, target = None, None
            problem(err.strerror or str(err))
            continue
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != seen:
            seen, failed = key, None
            try:
                target, said = read_pointer(path), ""
            except ValueError as err:
                target = None
                problem(str(err))
        engine = state.engine
        if target is None or engine is None or target == failed or state.reload_lock.locked():
            continue
        if target == engine.run.resolve():
            continue
        async with state.reload_lock:
            try:
                old, new = await state.swap(str(target), state.settings.backend, "followed")
            except Exception as err:  # a broken run must not take the server down
                state.metrics.reloads.labels("failed").inc()
                failed = target
                problem(f"could not load {target} ({type(err).__name__}: {err})")
                continue
        was = (old.run, old.version) if old else (None, None)
        del old  # the replaced model goes with the next collection
        _freeze_heap()
        log.info("followed %s: now serving %s (%s version %s; was %s version %s)", path, new.run, new.name,
                 new.version, *was)


async def _publish(state: _State, every_s: float = PUBLISH_EVERY_S) -> None:
    while True:
        await asyncio.sleep(every_s)
        state.publish()


def app_from_env():
    """uvicorn factory for `--workers N`: each worker process builds its app from the settings in the env."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    _configure_logging()
    if not multiprocess_mode():
        raise RuntimeError(f"{MULTIPROC_ENV} was not set when prometheus_client was imported: /metrics of one "
                           "worker would not count the others")
    return create_app(settings)


# ---------------------------------------------------------------------------------------------------------------
# running it


def _configure_logging() -> None:
    logger = logging.getLogger("nnforge")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _say_event_loop() -> None:
    """uvicorn takes uvloop and httptools when they are installed (the deploy extra): the event loop, which parses
    every request, then spends about a tenth less CPU on each (benchmarks/serving.py, 32 clients, one core)."""
    fallback = {"uvloop": "asyncio's event loop", "httptools": "h11's pure-Python HTTP parser"}
    missing = [m for m in fallback if importlib.util.find_spec(m) is None]
    if missing:
        log.warning("serving with %s: `pip install %s` (in nnforge's deploy extra) for more requests per core",
                    " and ".join(fallback[m] for m in missing), " ".join(missing))


def serve(settings: ServeSettings) -> None:
    """Run the server until SIGTERM/SIGINT; requests in flight are answered before it exits."""
    import uvicorn

    settings.check()
    run = Path(settings.run)
    if not ((run / "model.onnx").is_file() or (run / "checkpoints" / "best.safetensors").is_file()):
        raise FileNotFoundError(f"{run}: neither model.onnx nor checkpoints/best.safetensors; is it a run folder?")
    if settings.capture:  # a folder that cannot hold the store fails here, with its reason, not in every worker
        from nnforge.deploy.capture import CaptureStore

        CaptureStore(settings.capture, create=True)
    _configure_logging()
    _say_event_loop()
    if settings.token and len(settings.token) < 16:
        log.warning("the bearer token is shorter than 16 characters; anyone who can reach the port may guess it")
    common = dict(host=settings.host, port=settings.port, access_log=settings.access_log, log_level="info",
                  # in-flight requests finish within their own timeout; then shutdown stops waiting
                  timeout_graceful_shutdown=math.ceil(settings.timeout_s) + 5)
    settings.threads = settings.threads or default_threads(settings.workers)
    if settings.workers > 1:
        with tempfile.TemporaryDirectory(prefix="nnforge-serve-") as tmp:
            settings.sync_file = str(Path(tmp) / "reload.json")
            metrics_dir = Path(tmp) / "metrics"  # each worker's metric files; /metrics merges them (prom.py)
            metrics_dir.mkdir()
            # the workers inherit both; prometheus_client reads its variable when a worker imports it
            env = {SETTINGS_ENV: json.dumps(asdict(settings)), MULTIPROC_ENV: str(metrics_dir)}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                uvicorn.run("nnforge.deploy.server:app_from_env", factory=True, workers=settings.workers, **common)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return
    failure: list[str] = []

    def fatal(message: str) -> None:  # the first load failed: nothing to serve, so stop and say why
        failure.append(message)
        server.should_exit = True

    server = uvicorn.Server(uvicorn.Config(create_app(settings, on_fatal=fatal), **common))
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; with these handlers that ends serve() normally
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise RuntimeError(f"{run}: the model could not be loaded: {failure[0]}")
