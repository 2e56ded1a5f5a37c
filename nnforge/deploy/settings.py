"""Server settings, checked before anything heavy is imported (a wrong flag fails in a moment).

    ServeSettings("runs/image/exp1", host="0.0.0.0", token=os.environ["NNFORGE_TOKEN"]).check()
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields


@dataclass
class ServeSettings:
    run: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    token: str | None = None          # bearer token; required when host is not a loopback address
    allow_reload: bool = False        # POST /v1/reload without a token (with one, the token guards it)
    reload_root: str | None = None    # reloads may name runs under this folder only; None: the served run's parent
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted besides the bound address and loopback names
    backend: str = "auto"             # auto: ONNX Runtime when RUN/model.onnx exists, else PyTorch
    int8: bool = False                # serve RUN/model.int8.onnx
    device: str = "auto"              # PyTorch backend only
    max_batch_size: int = 32
    max_wait_ms: float = 2.0          # how long a batch may wait for more inputs once it has one
    max_queue: int = 256              # inputs waiting or running; beyond this requests get 503
    timeout_s: float = 10.0           # per request, from arrival to answer (504 past it)
    max_body_mb: float = 16.0
    max_pixels: int = 25_000_000      # per image, checked from the header before decoding
    max_inputs: int = 64              # images or texts in one request
    top_k: int = 3
    access_log: bool = False
    threads: int = 0                  # intra-op threads per worker; 0 = cores / workers
    sync_file: str | None = None      # with several workers: where a reload tells the other workers
    capture: str | None = None        # folder of the capture store (deploy/capture.py); None: capture nothing
    capture_threshold: float = 0.6    # capture inputs whose top probability is below this
    capture_margin: float = 0.2       # ... or whose top-two probability margin is below this
    capture_sample: float = 0.02      # ... plus this share of all other inputs, at random (an unbiased sample)
    capture_max_mb: float = 500.0     # the store's files stay under this; the oldest unlabelled items go first
    follow: str | None = None         # an alias pointer file (loop/registry.py): serve the run it names, as it moves

    def check(self) -> None:
        for name in ("port", "workers", "max_batch_size", "max_queue", "max_pixels", "max_inputs", "top_k"):
            if int(getattr(self, name)) < (0 if name == "port" else 1):
                raise ValueError(f"serve: {name} must be a positive integer, got {getattr(self, name)}")
        for name in ("timeout_s", "max_body_mb"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"serve: {name} must be > 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"serve: max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("capture_threshold", "capture_margin", "capture_sample"):
            if not 0 <= float(getattr(self, name)) <= 1:
                raise ValueError(f"serve: {name} must be between 0 and 1, got {getattr(self, name)}")
        if not float(self.capture_max_mb) > 0:
            raise ValueError(f"serve: capture_max_mb must be > 0, got {self.capture_max_mb}")
        if self.backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"serve: backend {self.backend!r}; expected auto, onnx or torch")
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"serve: binding to {self.host} exposes the model beyond this machine; set a bearer "
                             "token with --token or the NNFORGE_TOKEN environment variable")


def allowed_host_names(settings: ServeSettings) -> set[str] | None:
    """The Host header names the server answers: on a loopback bind its own names plus --allowed-hosts (DNS
    rebinding cannot reach it); on another bind, where a token is required, any name unless --allowed-hosts."""
    extra = {h.strip().lower() for h in settings.allowed_hosts if h.strip()}
    if is_loopback(settings.host):
        return {"localhost", "127.0.0.1", "::1", settings.host.lower(), *extra}
    return ({settings.host.lower(), *extra} if extra else None)


def reload_root(settings: ServeSettings) -> str:
    from pathlib import Path

    return str(Path(settings.reload_root or Path(settings.run).resolve().parent).resolve())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def serve_defaults() -> dict:
    return {f.name: f.default for f in fields(ServeSettings) if f.name != "run"}


def default_threads(workers: int, cores: int | None = None) -> int:
    """Inference threads per worker: its share of the cores, so that several workers do not oversubscribe them.

    The cores are those this process may run on (taskset, a container's cpuset), not all the machine has: two
    threads pinned to one core would only take turns.
    """
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)
