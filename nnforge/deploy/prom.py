"""The server's Prometheus metrics, one view over every worker process (prometheus_client's multiprocess mode).

    metrics = ServerMetrics()
    metrics.requests.labels(path="/v1/predict", code="200").inc()
    body = metrics.render()          # what GET /metrics answers, CONTENT_TYPE

With `--workers N`, serve() points PROMETHEUS_MULTIPROC_DIR at a fresh temporary folder before the workers start
(prometheus_client chooses its storage when it is imported, so the variable must be set before that). Each worker
then writes its values into its own memory-mapped files there, and /metrics merges the files of all workers: any
worker answers for the whole server. Counters and histograms of a worker that died stay in its files and keep
counting in the totals; gauges count live processes only ("live" modes, below). A gauge cannot be read by a
callback at scrape time (the scrape happens in one worker, the value lives in another), so every gauge is set
where its value changes. A single process keeps its values in memory, as prometheus_client does by default.

Memory stays bounded: every label takes a bounded set of values (paths outside the server's routes share the
label "other"; status codes; reload results; one model_info series per model version served; capture reasons; the
first MAX_CLASS_LABELS classes of each model served, the rest "other"; drift signals, and with several workers one
pid per live worker).
"""

from __future__ import annotations

import glob
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__all__ = ["CONTENT_TYPE", "MAX_CLASS_LABELS", "MULTIPROC_ENV", "ServerMetrics", "multiprocess_mode"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the drift reference's 10 bins
MAX_CLASS_LABELS = 50  # classes named in nnforge_predictions_total; the others share "other"
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

disable_created_metrics()  # the *_created series: one more line per series that nobody here reads


def multiprocess_mode() -> bool:
    """Whether this process writes its metrics to PROMETHEUS_MULTIPROC_DIR (decided when prometheus_client loaded)."""
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


class ServerMetrics:
    """Every metric nnforge serve exposes; one instance per app (the ASGI layer and the model state share it)."""

    def __init__(self):
        self.folder = os.environ.get(MULTIPROC_ENV) if multiprocess_mode() else None
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self.folder else self.registry  # multiprocess: the values live in files, merged at scrape

        # HTTP, recorded by asgi.Metrics for every answer
        self.requests = Counter("nnforge_requests_total", "HTTP requests.", ["path", "code"], registry=reg)
        self.errors = Counter("nnforge_errors_total", "HTTP 4xx and 5xx answers.", ["code"], registry=reg)
        self.latency = Histogram("nnforge_request_duration_seconds", "Time to answer.", ["path"],
                                 buckets=LATENCY_BUCKETS, registry=reg)
        self.in_flight = Gauge("nnforge_requests_in_flight", "HTTP requests being received or answered.",
                               multiprocess_mode="livesum", registry=reg)
        # the model and its batches
        self.batch_size = Histogram("nnforge_batch_size", "Inputs per forward pass.", buckets=BATCH_BUCKETS,
                                    registry=reg)
        self.inference = Histogram("nnforge_inference_seconds", "One forward pass.", buckets=LATENCY_BUCKETS,
                                   registry=reg)
        self.queue_wait = Histogram("nnforge_queue_wait_seconds", "From an input's arrival in the batcher's queue "
                                    "to the start of its forward pass.", buckets=LATENCY_BUCKETS, registry=reg)
        self.pending = Gauge("nnforge_inputs_pending", "Inputs queued or running.", multiprocess_mode="livesum",
                             registry=reg)
        self.reloads = Counter("nnforge_reloads_total", "Model reloads.", ["result"], registry=reg)
        # livemin: 1 only when every live worker serves a model
        self.ready = Gauge("nnforge_ready", "1 once a model is loaded and warmed.", multiprocess_mode="livemin",
                           registry=reg)
        # livemax: 1 for each version some worker serves (briefly two while the workers follow a reload)
        self.model_info = Gauge("nnforge_model_info", "The model being served.", ["name", "version", "backend"],
                                multiprocess_mode="livemax", registry=reg)
        # where a request's time goes besides the model: the process stopped for the garbage collector, and the
        # event loop busy with other requests (how late a timer fires)
        self.gc_pause = Histogram("nnforge_gc_pause_seconds", "Garbage-collector pauses, by generation.",
                                  ["generation"], buckets=PAUSE_BUCKETS, registry=reg)
        self.loop_lag = Histogram("nnforge_event_loop_lag_seconds", "How late the event loop runs a timer.",
                                  buckets=PAUSE_BUCKETS, registry=reg)
        # feedback capture (--capture): inputs chosen to keep, by reason (low_confidence, sample), and chosen inputs
        # that were not written (the writer's queue full, or the disk refused)
        self.captured = Counter("nnforge_capture_items_total", "Inputs chosen for capture, by reason.", ["reason"],
                                registry=reg)
        self.capture_dropped = Counter("nnforge_capture_dropped_total", "Inputs chosen for capture but not written "
                                       "(queue full or write failed).", registry=reg)
        # what the classifier answers: its top probabilities and predicted classes (the first MAX_CLASS_LABELS
        # classes by name, the rest "other"), and each worker's drift from its run's reference (deploy/drift.py).
        # liveall: one series per live worker (a pid label with several workers), each over its own window; a
        # worker that exits takes its series with it
        self.confidence = Histogram("nnforge_prediction_confidence", "Top probability of each answer.",
                                    buckets=CONFIDENCE_BUCKETS, registry=reg)
        self.predicted = Counter("nnforge_predictions_total", "Answers by predicted class.", ["class"],
                                 registry=reg)
        self.drift_psi = Gauge("nnforge_drift_psi", "Population Stability Index of this worker's last answers "
                               "against the run's evaluated split (<0.1 stable, 0.1-0.25 moderate, >0.25 "
                               "significant); NaN until enough answers.", ["signal"], multiprocess_mode="liveall",
                               registry=reg)
        self.drift_window = Gauge("nnforge_drift_window", "Answers in this worker's drift window.",
                                  multiprocess_mode="liveall", registry=reg)
        self._model: tuple[str, str, str] | None = None

    def serving(self, name: str, version: str, backend: str) -> None:
        """The model now answering: its model_info series 1, the previous one's 0 (a file cannot drop a series)."""
        if self._model and self._model != (name, version, backend):
            self.model_info.labels(*self._model).set(0)
        self._model = (name, version, backend)
        self.model_info.labels(*self._model).set(1)
        self.ready.set(1)

    def render(self) -> bytes:
        if not self.folder:
            return generate_latest(self.registry)
        _forget_dead_processes(self.folder)
        registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(registry, self.folder)
        return generate_latest(registry)

    def close(self) -> None:
        """At a clean exit: this process's gauges leave the sums (its counters stay)."""
        if self.folder:
            mark_process_dead(os.getpid(), self.folder)


def _forget_dead_processes(folder: str) -> None:
    """Drop the gauges of workers that died without closing (killed): uvicorn restarts them under new pids."""
    pids = {os.path.basename(f).rsplit("_", 1)[-1][:-3] for f in glob.glob(os.path.join(folder, "gauge_live*_*.db"))}
    for pid in pids:
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process under a reused pid: not ours, but leave its files be
        return True
    return True
