"""Serving: `nnforge serve` (ONNX Runtime, micro-batching) vs plain FastAPI running eager PyTorch per request.

    .venv/bin/python benchmarks/serving.py                        # resnet_tiny and resnet18 on Fashion-MNIST
    .venv/bin/python benchmarks/serving.py --models resnet_tiny --requests 300 --clients 1 8 32

For each model: train a quick run on Fashion-MNIST (the Debian package; generated shapes when it is missing),
export it, then on this machine and 127.0.0.1 serve it twice, one server at a time: `nnforge serve` with its
defaults, and the baseline below. A keep-alive HTTP/1.1 client (asyncio streams, cheap next to httpx) uploads
the same test PNGs as multipart files from 1, 8 and 32 concurrent connections and records requests per second
and p50/p99 latency. Last, without HTTP, the single-input latency of ONNX Runtime over eager PyTorch.
The figures are ratios measured side by side: absolute numbers move with the machine's load (printed too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, UploadFile  # at module level: the endpoint's annotations must resolve

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# ---------------------------------------------------------------------------------------------------------------
# the baseline: what a first deployment usually looks like


def baseline_app(run: str):
    """FastAPI, one sync endpoint, the loaded run (same preprocessing, eager PyTorch) called per request."""
    from nnforge.inference import Loaded

    pred = Loaded(run)
    app = FastAPI()

    @app.post("/v1/predict")
    def predict(file: UploadFile = File(...)):  # noqa: B008 (FastAPI's idiom)  a plain def: runs on a thread pool
        return {"predictions": pred.predict([file.file.read()], top_k=3)}

    @app.get("/ready")
    def ready():
        return {"ready": True}

    return app


# ---------------------------------------------------------------------------------------------------------------
# data, runs, servers


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare_data(work: Path, per_class: int) -> Path:
    from nnforge.data import fashion_mnist

    try:
        return fashion_mnist.write_tree(work / "fashion-mnist", limit_per_class=per_class)
    except FileNotFoundError as err:  # no Debian dataset: three drawn shapes instead
        print(f"{err}; using generated shapes", file=sys.stderr)
        from PIL import Image

        rng = np.random.default_rng(0)
        root = work / "shapes"
        yy, xx = np.mgrid[:28, :28]
        masks = {"stripes": (yy // 3) % 2 == 0, "checks": ((yy // 4) + (xx // 4)) % 2 == 0,
                 "blob": (yy - 14) ** 2 + (xx - 14) ** 2 < 80}
        for split in ("train", "test"):
            for cls, mask in masks.items():
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    img = rng.integers(0, 60, (28, 28)).astype(np.uint8)
                    img[mask] = 220
                    Image.fromarray(img).save(root / split / cls / f"{i:04d}.png")
        return root


def prepare_run(data: Path, work: Path, model: str) -> Path:
    import nnforge

    run = work / "runs" / "image" / model
    if not (run / "checkpoints" / "best.safetensors").is_file():
        shutil.rmtree(run, ignore_errors=True)
        nnforge.train("image", data=str(data), model=model, epochs=1, batch_size=64, out=str(work / "runs"),
                      name=model, precision="fp32")
    if not (run / "model.onnx").is_file():
        nnforge.export(run)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} not ready after 180 s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# the load generator


def multipart_request(port: int, name: str, png: bytes) -> bytes:
    boundary = "nnforgebench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


async def load(port: int, requests: list[bytes], clients: int, total: int) -> dict:
    """`total` requests from `clients` keep-alive connections, after a short warm-up on the same connections."""
    latencies: list[float] = []
    errors = 0

    async def client(k: int, reader, writer, todo) -> None:
        nonlocal errors
        for i in todo:
            t0 = time.perf_counter()
            if await _one(reader, writer, requests[(i + k) % len(requests)]) != 200:
                errors += 1
            latencies.append(time.perf_counter() - t0)

    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    warm = iter(range(4 * clients))
    await asyncio.gather(*[client(k, r, w, warm) for k, (r, w) in enumerate(conns)])
    latencies.clear()
    errors = 0
    todo = iter(range(total))  # shared: a fast connection takes more requests, as a real client pool would
    t0 = time.perf_counter()
    await asyncio.gather(*[client(k, r, w, todo) for k, (r, w) in enumerate(conns)])
    wall = time.perf_counter() - t0
    for _, w in conns:
        w.close()
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": total, "errors": errors, "rps": total / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


# ---------------------------------------------------------------------------------------------------------------
# in-process: ONNX Runtime vs eager PyTorch for one input


def single_input_latency(run: Path, images: list[Path], repeats: int = 300) -> list[dict]:
    """Median ms for one input, eager PyTorch vs ONNX Runtime: with the libraries' default threads, and with one
    thread each (on a loaded machine, multi-threaded eager PyTorch suffers most from waiting for its threads)."""
    import torch

    from nnforge.deploy.engine import load_engine
    from nnforge.inference import Loaded

    pred = Loaded(run, device="cpu")
    xs = [pred.input.batch([pred.input.load(p)]) for p in images[:20]]

    def median_ms(fn) -> float:
        for x in xs:
            fn(x)
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(xs[i % len(xs)])
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1000)

    rows, default = [], torch.get_num_threads()
    for threads in (default, 1):
        torch.set_num_threads(threads)
        ort_engine = load_engine(run, backend="onnx", threads=threads)
        eager, ort = median_ms(pred.forward), median_ms(ort_engine.forward)
        rows.append({"threads": threads, "eager_ms": eager, "onnxruntime_ms": ort, "ratio_ort_over_eager": ort / eager,
                     "load_average": load_average()})
    torch.set_num_threads(default)
    return rows


# ---------------------------------------------------------------------------------------------------------------


def bench_model(model: str, data: Path, work: Path, args) -> dict:
    run = prepare_run(data, work, model)
    images = sorted((data / "test").rglob("*.png"))[:: max(1, len(list((data / "test").rglob("*.png"))) // 64)]
    result = {"model": model, "single_input": single_input_latency(run, images), "servers": {}}
    if args.no_http:
        return result
    servers = {
        "nnforge": [PY, "-m", "nnforge.cli", "serve", str(run)],
        "baseline": [PY, str(Path(__file__).resolve()), "--baseline-server", str(run)],
    }
    for name, cmd in servers.items():
        port = free_port()
        proc = start(cmd + ["--port", str(port)], port, work / f"{model}-{name}.log")
        try:
            requests = [multipart_request(port, p.name, p.read_bytes()) for p in images]
            rows = []
            for c in args.clients:
                row = asyncio.run(load(port, requests, c, args.requests))
                row["load_average"] = load_average()
                rows.append(row)
                print(f"{model:12s} {name:9s} clients {c:3d}: {row['rps']:7.1f} req/s  p50 {row['p50_ms']:7.2f} ms  "
                      f"p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}  (load {row['load_average']})",
                      file=sys.stderr, flush=True)
            result["servers"][name] = rows
        finally:
            stop(proc)
    return result


def report(results: list[dict], args, started: str) -> str:
    lines = [f"date: {started}; machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
             f"python {platform.python_version()}",
             f"command: {' '.join([Path(sys.executable).name, *sys.argv])}"]
    if any(r["servers"] for r in results):
        lines += ["", "| model | clients | baseline req/s | nnforge req/s | ratio | baseline p50 / p99 ms "
                  "| nnforge p50 / p99 ms | 1-min load avg (baseline / nnforge) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for b, n in zip(r["servers"].get("baseline", []), r["servers"].get("nnforge", []), strict=True):
            lines.append(f"| {r['model']} | {b['clients']} | {b['rps']:.0f} | {n['rps']:.0f} | "
                         f"{n['rps'] / b['rps']:.2f}x | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} | "
                         f"{n['p50_ms']:.1f} / {n['p99_ms']:.1f} | {b['load_average'].split()[0]} / "
                         f"{n['load_average'].split()[0]} |")
    lines += ["", "| model | threads | eager PyTorch ms | ONNX Runtime ms | ONNX / eager | 1-min load avg |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for s in r["single_input"]:
            lines.append(f"| {r['model']} | {s['threads']} | {s['eager_ms']:.3f} | {s['onnxruntime_ms']:.3f} | "
                         f"{s['ratio_ort_over_eager']:.2f} | {s['load_average'].split()[0]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet_tiny", "resnet18"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=600, help="measured requests per concurrency level")
    ap.add_argument("--per-class", type=int, default=100, help="Fashion-MNIST images per class for the quick runs")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-serving")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--no-http", action="store_true", help="only the in-process ONNX Runtime vs eager latency")
    ap.add_argument("--baseline-server", metavar="RUN", help=argparse.SUPPRESS)  # internal: run the baseline
    ap.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        import uvicorn

        uvicorn.run(baseline_app(args.baseline_server), host="127.0.0.1", port=args.port, access_log=False,
                    log_level="warning")
        return 0
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.work, args.per_class)
    results = [bench_model(m, data, args.work, args) for m in args.models]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(report(results, args, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
