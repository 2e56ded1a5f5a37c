"""Serving: `nnforge serve` (ONNX Runtime, micro-batching) vs plain FastAPI running eager PyTorch per request.

    .venv/bin/python benchmarks/serving.py                        # resnet_tiny and resnet18 on Fashion-MNIST
    .venv/bin/python benchmarks/serving.py --models resnet_tiny --servers nnforge --clients 8 32 --requests 5000 \
        --repeats 3 --json serving.json                          # the server alone, three times per level

For each model: train a quick run on Fashion-MNIST (the Debian package; generated shapes when it is missing),
export it, then on this machine and 127.0.0.1 serve it, one server at a time: `nnforge serve` with its defaults,
and the baseline below. The load generator, a keep-alive HTTP/1.1 client (asyncio streams, cheap next to httpx),
runs in a process of its own and uploads the same test PNGs as multipart files from 1, 8 and 32 concurrent
connections; it records requests per second and p50/p99 latency as the client sees them.

So that the figures measure the server and not the load generator fighting it for the CPU, the two are pinned to
different cores when the machine has two or more (sched_setaffinity: the load generator on the last core, the
server on the others; --no-pin to share them), and each row says how much CPU each side used: the load
generator's own CPU seconds and the server's (its process and its children), over the measured requests only,
beside the machine's load average. For nnforge the row also says where the server's time went, from its /metrics
before and after: batch sizes, how long inputs waited for the batcher, forward passes, garbage-collector pauses
and event-loop lag. Last, without HTTP, the single-input latency of ONNX Runtime over eager PyTorch.
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


def split_cores(pin: bool) -> tuple[list[int] | None, list[int] | None]:
    """(server cores, load-generator cores): the last core for the load generator, the others for the server."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cores) < 2:
        return None, None
    return cores[:-1], cores[-1:]


def pinned(cmd: list[str], cores: list[int] | None) -> list[str]:
    """`cmd` started through this script's --pin trampoline: its process and every thread it starts stay on `cores`."""
    if not cores:
        return cmd
    return [PY, str(Path(__file__).resolve()), "--pin", ",".join(map(str, cores)), "--", *cmd]


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
# the load generator, in a process of its own (run_load_generator): what it measures comes back as one JSON line


def multipart_request(port: int, name: str, png: bytes) -> bytes:
    boundary = "nnforgebench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, await reader.readexactly(length)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (a server's workers), from /proc."""
    tick, total, todo = os.sysconf("SC_CLK_TCK"), 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            total += sum(int(x) for x in stat.rsplit(")", 1)[1].split()[11:13]) / tick  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):  # gone meanwhile, or no /proc: counted as nothing
            pass
    return total


async def scrape(port: int) -> dict[tuple, float]:
    """The server's /metrics as {(sample name, sorted label pairs): value}; {} when it has none (the baseline)."""
    from prometheus_client.parser import text_string_to_metric_families

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, body = await _one(reader, writer, f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    finally:
        writer.close()
    if status != 200:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def _bucket_quantile(before: dict, after: dict, name: str, q: float, **labels: str) -> float | None:
    """Upper bound (seconds) of the histogram bucket holding quantile q of what was observed between two scrapes."""
    want = tuple(sorted(labels.items()))
    counts = sorted((float(dict(k[1])["le"]), v - before.get(k, 0.0)) for k, v in after.items()
                    if k[0] == name + "_bucket" and tuple(x for x in k[1] if x[0] != "le") == want)
    if not counts or counts[-1][1] <= 0:
        return None
    return next(le for le, c in counts if c >= q * counts[-1][1])


def server_breakdown(before: dict, after: dict) -> dict:
    """Where the server's time went between two scrapes of nnforge's /metrics."""
    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches, inputs = delta("nnforge_batch_size_count"), delta("nnforge_batch_size_sum")
    gc = {g: (delta("nnforge_gc_pause_seconds_count", generation=g),
              delta("nnforge_gc_pause_seconds_sum", generation=g)) for g in ("0", "1", "2")}

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else seconds * 1000
    return {
        "batches": batches, "mean_batch": inputs / batches if batches else None,
        "queue_wait_mean_ms": ms(delta("nnforge_queue_wait_seconds_sum") / inputs) if inputs else None,
        "queue_wait_p99_le_ms": ms(_bucket_quantile(before, after, "nnforge_queue_wait_seconds", 0.99)),
        "forward_mean_ms": ms(delta("nnforge_inference_seconds_sum") / batches) if batches else None,
        "server_p99_le_ms": ms(_bucket_quantile(before, after, "nnforge_request_duration_seconds", 0.99,
                                                path="/v1/predict")),
        "gc_pauses": {g: n for g, (n, _) in gc.items()}, "gc_pause_ms": ms(sum(s for _, s in gc.values())),
        "gc_max_le_ms": ms(max((_bucket_quantile(before, after, "nnforge_gc_pause_seconds", 1.0, generation=g)
                                or 0.0) for g in gc)),
        "loop_lag_p99_le_ms": ms(_bucket_quantile(before, after, "nnforge_event_loop_lag_seconds", 0.99)),
        "loop_lag_max_le_ms": ms(_bucket_quantile(before, after, "nnforge_event_loop_lag_seconds", 1.0)),
    }


async def load(port: int, requests: list[bytes], clients: int, total: int, server_pid: int) -> dict:
    """`total` requests from `clients` keep-alive connections, after a short warm-up on the same connections."""
    latencies: list[float] = []
    errors = 0

    async def client(k: int, reader, writer, todo) -> None:
        nonlocal errors
        for i in todo:
            t0 = time.perf_counter()
            if (await _one(reader, writer, requests[(i + k) % len(requests)]))[0] != 200:
                errors += 1
            latencies.append(time.perf_counter() - t0)

    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    warm = iter(range(4 * clients))
    await asyncio.gather(*[client(k, r, w, warm) for k, (r, w) in enumerate(conns)])
    latencies.clear()
    errors = 0
    metrics0 = await scrape(port)
    todo = iter(range(total))  # shared: a fast connection takes more requests, as a real client pool would
    cpu0, server_cpu0, t0 = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
    await asyncio.gather(*[client(k, r, w, todo) for k, (r, w) in enumerate(conns)])
    wall = time.perf_counter() - t0
    cpu, server_cpu = time.process_time() - cpu0, cpu_seconds(server_pid) - server_cpu0
    load_avg = load_average()
    metrics1 = await scrape(port)
    for _, w in conns:
        w.close()
    ms = np.asarray(latencies) * 1000
    row = {"clients": clients, "requests": total, "errors": errors, "seconds": wall, "rps": total / wall,
           "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
           "max_ms": float(ms.max()), "client_cpu_s": cpu, "server_cpu_s": server_cpu, "load_average": load_avg}
    if metrics1:
        row["server"] = server_breakdown(metrics0, metrics1)
    return row


def run_load_generator(args) -> int:
    """--load-generator: measure one concurrency level against the server on args.port, print a JSON line."""
    if args.cores:
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    paths = json.loads(Path(args.images).read_text())
    requests = [multipart_request(args.port, Path(p).name, Path(p).read_bytes()) for p in paths]
    row = asyncio.run(load(args.port, requests, args.clients[0], args.requests, args.server_pid))
    print(json.dumps(row), flush=True)
    return 0


def measure(port: int, server_pid: int, images_file: Path, clients: int, total: int, cores: list[int] | None) -> dict:
    cmd = [PY, str(Path(__file__).resolve()), "--load-generator", "--port", str(port), "--server-pid",
           str(server_pid), "--images", str(images_file), "--clients", str(clients), "--requests", str(total)]
    if cores:
        cmd += ["--cores", ",".join(map(str, cores))]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"load generator failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def _server_pid(proc: subprocess.Popen) -> int:
    return proc.pid  # the --pin trampoline execs the server in place: same pid


def bench_model(model: str, data: Path, work: Path, args) -> dict:
    run = prepare_run(data, work, model)
    images = sorted((data / "test").rglob("*.png"))[:: max(1, len(list((data / "test").rglob("*.png"))) // 64)]
    result = {"model": model, "single_input": single_input_latency(run, images), "servers": {}}
    if args.no_http:
        return result
    images_file = work / "bench-images.json"
    images_file.write_text(json.dumps([str(p) for p in images]))
    server_cores, client_cores = split_cores(not args.no_pin)
    result["pinning"] = ({"server_cores": server_cores, "load_generator_cores": client_cores} if server_cores
                         else None)
    servers = {
        "nnforge": [PY, "-m", "nnforge.cli", "serve", str(run), *args.serve_args],
        "baseline": [PY, str(Path(__file__).resolve()), "--baseline-server", str(run)],
    }
    for name in args.servers:
        port = free_port()
        proc = start(pinned(servers[name] + ["--port", str(port)], server_cores), port, work / f"{model}-{name}.log")
        try:
            rows = []
            for c in args.clients:
                for rep in range(args.repeats):
                    row = measure(port, _server_pid(proc), images_file, c, args.requests, client_cores)
                    row["repeat"] = rep
                    rows.append(row)
                    print(f"{model:12s} {name:9s} clients {c:3d}: {row['rps']:7.1f} req/s  p50 {row['p50_ms']:7.2f} "
                          f"ms  p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}  CPU s: load generator "
                          f"{row['client_cpu_s']:.2f}, server {row['server_cpu_s']:.2f} in {row['seconds']:.2f} s "
                          f"(load {row['load_average']})", file=sys.stderr, flush=True)
            result["servers"][name] = rows
        finally:
            stop(proc)
    return result


def _spread(rows: list[dict], key: str, fmt: str = ".1f") -> str:
    xs = [r[key] for r in rows]
    return f"{np.mean(xs):{fmt}}" + (f" ± {np.std(xs, ddof=1):{fmt}}" if len(xs) > 1 else "")


def _le(x: float | None) -> str:
    return "-" if x is None else f"<={x:g}"


def report(results: list[dict], args, started: str) -> str:
    lines = [f"date: {started}; machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
             f"python {platform.python_version()}",
             f"command: {' '.join([Path(sys.executable).name, *sys.argv])}"]
    for r in results:
        if not r["servers"]:
            continue
        pin = r.get("pinning")
        lines += ["", f"{r['model']}: " + (f"server pinned to CPU {pin['server_cores']}, load generator to CPU "
                                           f"{pin['load_generator_cores']} (sched_setaffinity)" if pin else
                                           "server and load generator share the CPUs (not pinned)"),
                  f"{args.requests} measured requests per row after a warm-up; {args.repeats} repeat(s): mean ± sd",
                  "", "| server | clients | req/s | p50 ms | p99 ms | errors | load generator CPU % | server CPU % "
                  "| load avg 1/5/15 min |", "|---|---|---|---|---|---|---|---|---|"]
        for name, rows in r["servers"].items():
            for c in args.clients:
                rs = [x for x in rows if x["clients"] == c]
                for x in rs:
                    x["client_cpu_pct"] = 100 * x["client_cpu_s"] / x["seconds"]
                    x["server_cpu_pct"] = 100 * x["server_cpu_s"] / x["seconds"]
                lines.append(f"| {name} | {c} | {_spread(rs, 'rps', '.0f')} | {_spread(rs, 'p50_ms')} | "
                             f"{_spread(rs, 'p99_ms')} | {sum(x['errors'] for x in rs)} | "
                             f"{_spread(rs, 'client_cpu_pct', '.0f')} | {_spread(rs, 'server_cpu_pct', '.0f')} | "
                             f"{rs[-1]['load_average']} |")
        rows = [x for x in r["servers"].get("nnforge", []) if "server" in x]
        if rows:
            lines += ["", "Where nnforge's time went (from its /metrics; '<=x': the histogram bucket, in ms):", "",
                      "| clients | mean batch | queue wait mean / p99 ms | forward mean ms | server-side p99 ms "
                      "| GC pauses gen0/1/2 (total ms, max) | event-loop lag p99 / max ms |",
                      "|---|---|---|---|---|---|---|"]
            for x in rows:
                s = x["server"]
                gc = "/".join(f"{s['gc_pauses'][g]:.0f}" for g in ("0", "1", "2"))
                lines.append(f"| {x['clients']} | {s['mean_batch'] or 0:.1f} | {s['queue_wait_mean_ms'] or 0:.1f} / "
                             f"{_le(s['queue_wait_p99_le_ms'])} | {s['forward_mean_ms'] or 0:.2f} | "
                             f"{_le(s['server_p99_le_ms'])} | {gc} ({s['gc_pause_ms']:.1f}, "
                             f"{_le(s['gc_max_le_ms'])}) | "
                             f"{_le(s['loop_lag_p99_le_ms'])} / {_le(s['loop_lag_max_le_ms'])} |")
    lines += ["", "Single input, in-process, no HTTP (median of 300 forward passes):", "",
              "| model | threads | eager PyTorch ms | ONNX Runtime ms | ONNX / eager | 1-min load avg |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for s in r["single_input"]:
            lines.append(f"| {r['model']} | {s['threads']} | {s['eager_ms']:.3f} | {s['onnxruntime_ms']:.3f} | "
                         f"{s['ratio_ort_over_eager']:.2f} | {s['load_average'].split()[0]} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--pin":  # trampoline: pin this process, then become the command
        _, _, cores, _, *cmd = sys.argv
        os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        os.execv(cmd[0], cmd)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet_tiny", "resnet18"])
    ap.add_argument("--servers", nargs="+", choices=["nnforge", "baseline"], default=["nnforge", "baseline"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=600, help="measured requests per concurrency level")
    ap.add_argument("--repeats", type=int, default=1, help="measurements per concurrency level (mean ± sd)")
    ap.add_argument("--no-pin", action="store_true", help="let server and load generator share every core")
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                    help="the rest of the command line goes to `nnforge serve` (e.g. --threads 1); put it last")
    ap.add_argument("--per-class", type=int, default=100, help="Fashion-MNIST images per class for the quick runs")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-serving")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--no-http", action="store_true", help="only the in-process ONNX Runtime vs eager latency")
    ap.add_argument("--baseline-server", metavar="RUN", help=argparse.SUPPRESS)  # internal: run the baseline
    ap.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    ap.add_argument("--load-generator", action="store_true", help=argparse.SUPPRESS)  # internal: one measurement
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    ap.add_argument("--cores", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_generator:
        return run_load_generator(args)
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
