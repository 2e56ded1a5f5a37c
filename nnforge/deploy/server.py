"""The HTTP server: FastAPI + uvicorn, micro-batched, with limits that turn every bad request into a 4xx.

    nnforge serve runs/image/exp1 [--host 127.0.0.1] [--port 8000] [--workers N] [--token T] [--allow-reload]
    curl -F file=@shoe.png http://127.0.0.1:8000/v1/predict

Endpoints: POST /v1/predict (images as multipart files, JSON {"images": [base64, ...]} or one raw image body;
texts as JSON {"texts": [...]}), GET /health (alive, never needs the token), GET /ready (503 until the model is
loaded and warmed), GET /metrics (Prometheus, summed over all workers: prom.py), GET /v1/model, POST /v1/reload,
GET /docs (OpenAPI).

POST /v1/reload swaps the served model, so it is guarded: with a token it needs the token like every other path;
without one it is refused (403) unless the server was started with --allow-reload (ServeSettings.allow_reload),
because on a server without a token anyone who can reach the port could replace the model.

Requests pass three pure ASGI layers (asgi.py) before FastAPI: metrics (outermost, so it sees every status), the
bearer token, and the body limit, which refuses a too-large Content-Length before reading any of the body and
counts the bytes of a chunked body as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from nnforge.deploy.engine import Engine, load_engine
from nnforge.deploy.prom import CONTENT_TYPE, MULTIPROC_ENV, ServerMetrics, multiprocess_mode
from nnforge.deploy.settings import ServeSettings, allowed_host_names, default_threads, reload_root

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
    backend: str
    predictions: list[Prediction]


class ReloadRequest(BaseModel):
    run: str | None = None
    """Run folder to serve from now on; default: the one being served (after re-training or re-exporting)."""
    backend: Literal["auto", "onnx", "torch"] | None = None


_JSON_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}


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
        self.engine = engine
        self.metrics.serving(engine.name, engine.version, engine.backend)

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
    which no request moves, the p99 of a busy server. Frozen objects are still freed by reference counting.
    """
    gc.collect()
    gc.freeze()


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
        await state.batcher.start()
        gc_watch = _GcWatch()
        tasks = [asyncio.create_task(first_load()), asyncio.create_task(_watch_pauses(state.metrics, gc_watch))]
        if settings.sync_file:
            tasks.append(asyncio.create_task(_follow_reloads(state)))
        yield
        for t in tasks:
            t.cancel()
        gc_watch.close()
        await state.batcher.stop()
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
        return state.engine.describe() | {"worker_pid": os.getpid(), "reloads": state.generation,
                                          "limits": {k: getattr(settings, k) for k in limits}}

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
        rows = engine.output.rows([name for name, _ in items], engine.output.finish(outputs),
                                  top_k=top_k or settings.top_k, **asked)
        # a JSONResponse as is: FastAPI's encoder would walk every float again (a fifth of a small request's cost)
        return JSONResponse({"model": engine.name, "version": engine.version, "backend": engine.backend,
                             engine.output.response_key: rows})

    answers = {200: {"description": "one answer per input, under the output kind's key (predictions, ...)"},
               400: {"description": "an input that cannot be read"},
               404: {"description": "the run answers another verb"},
               413: {"description": "body, input count or image too large"},
               415: {"description": "unaccepted Content-Type"},
               503: {"description": "not ready, or the queue is full (see Retry-After)"},
               504: {"description": "no answer within the request timeout"}}

    def route(verb: str):
        async def handler(request: Request, top_k: int | None = Query(None, ge=1, le=1000)):
            return await answer(verb, request, top_k)

        # the served run's own input kind says what its verb's body may be (the schema is that of the run the server
        # started with; a reload to a run of another kind does not rewrite it)
        served = io if io and io.get("verb", "predict") == verb else None
        content = input_kind(served["input"]["kind"]).openapi_content(served["input"]) if served else None
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
                new = await asyncio.to_thread(state.load, str(resolved), req.backend or settings.backend)
            except Exception as err:  # a bad folder must not take the server down; the caller learns no paths
                state.metrics.reloads.labels("failed").inc()
                log.error("reload of %s failed: %s: %s", run, type(err).__name__, err)
                still = f"still serving version {old.version}" if old else "no model is being served"
                return _error(422, f"reload failed ({type(err).__name__}; the server log has the details); {still}")
            state.use(new)
            state.metrics.reloads.labels("ok").inc()
            _announce_reload(state, run, req.backend or settings.backend)
        _freeze_heap()
        log.info("reloaded: %s %s version %s (was %s) in %.2fs", new.name, new.backend, new.version,
                 old.version if old else None, new.load_seconds)
        return {"model": new.name, "version": new.version, "backend": new.backend,
                "previous_version": old.version if old else None, "load_seconds": round(new.load_seconds, 3)}

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
                new = await asyncio.to_thread(state.load, news["run"], news["backend"])
            except Exception as err:
                log.error("following a reload of %s failed: %s", news.get("run"), err)
                state.generation = news["generation"]  # do not retry a broken folder every half second
                continue
            state.use(new)
            state.generation = news["generation"]
            state.metrics.reloads.labels("ok").inc()
            log.info("followed a reload: %s version %s", new.name, new.version)
        _freeze_heap()


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
