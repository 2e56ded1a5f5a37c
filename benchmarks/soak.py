"""Soak: `nnforge serve --workers 2` under bounded mixed load for a while, with a reload every minute.

    python benchmarks/soak.py --minutes 10 [--work .cache/soak] [--json soak.json]

The load (from this process, on asyncio): valid uploads (each answer checked against `nnforge predict`), invalid
bodies (not an image, bad JSON, an unknown field), oversized bodies (over --max-body-mb), and slow senders (a body
trickled over several seconds); a reload of the same run every minute. Reported: answers by kind and status, any 5xx,
any valid request without a correct 200, the p50/p99 latency of valid requests, and the resident memory of the
server's processes sampled every 10 s (the growth from the first minute to the last is the figure that matters).
Exit status 1 if a 5xx was seen or a valid request was dropped or answered wrongly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RELOAD_EVERY = 60.0  # seconds; --reload-every
sys.path.insert(0, str(ROOT))

from benchmarks._server import free_port, start_server  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn's workers), from /proc."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def prepare(work: Path) -> tuple[Path, list[Path]]:
    """A small exported Fashion-MNIST run (100 images per class, 1 epoch), and test PNGs to send."""
    import nnforge
    from nnforge.data.fashion_mnist import write_tree

    data = write_tree(work / "fm", limit_per_class=100)
    run = work / "runs" / "image" / "soak"
    if not (run / "model.onnx").exists():
        nnforge.train("image", data=str(data), epochs=1, out=str(work / "runs"), name="soak")
        nnforge.export(run)
    images = sorted((data / "test").rglob("*.png"))[:64]
    return run, images


async def soak(url: str, run: Path, images: list[Path], minutes: float, pid: int) -> dict:
    import nnforge

    expected = {str(p): r["labels"][0] for p, r in zip(images, nnforge.predict(run, [str(p) for p in images]),
                                                        strict=True)}
    counts: dict[str, int] = {}
    latencies: list[float] = []
    failures: list[str] = []
    rss: list[tuple[float, float]] = []
    end = time.monotonic() + minutes * 60
    rng = random.Random(0)

    def count(kind: str, status: int) -> None:
        counts[f"{kind} {status}"] = counts.get(f"{kind} {status}", 0) + 1
        if status >= 500 and not (kind == "slow" and status == 504):
            failures.append(f"{kind}: {status}")

    async def valid(c: httpx.AsyncClient):
        p = rng.choice(images)
        t0 = time.perf_counter()
        r = await c.post(url + "/v1/predict", files={"file": (p.name, p.read_bytes(), "image/png")})
        latencies.append(time.perf_counter() - t0)
        count("valid", r.status_code)
        if r.status_code == 503:
            return  # the bounded queue said "retry": counted, not a drop
        if r.status_code != 200 or r.json()["predictions"][0]["labels"][0] != expected[str(p)]:
            failures.append(f"valid {p.name}: {r.status_code} {r.text[:200]}")

    async def invalid(c: httpx.AsyncClient):
        body = rng.choice([{"content": b"not an image", "headers": {"content-type": "image/png"}},
                           {"content": b"{bad json", "headers": {"content-type": "application/json"}},
                           {"json": {"texts": ["a"]}}, {"json": {"images": ["@@"]}}])
        count("invalid", (await c.post(url + "/v1/predict", **body)).status_code)

    async def oversized(c: httpx.AsyncClient):
        r = await c.post(url + "/v1/predict", content=b"\0" * (3 << 20), headers={"content-type": "image/png"})
        count("oversized", r.status_code)

    async def slow(c: httpx.AsyncClient):
        async def trickle():
            for _ in range(6):
                yield b"\0" * 100
                await asyncio.sleep(1.0)

        r = await c.post(url + "/v1/predict", content=trickle(), headers={"content-type": "image/png"})
        count("slow", r.status_code)

    async def client(kind):
        async with httpx.AsyncClient(timeout=60) as c:
            while time.monotonic() < end:
                try:
                    await kind(c)
                except httpx.HTTPError as err:
                    failures.append(f"{kind.__name__}: {type(err).__name__}")

    async def reloads():
        async with httpx.AsyncClient(timeout=120) as c:
            while RELOAD_EVERY and time.monotonic() < end - 30:
                await asyncio.sleep(RELOAD_EVERY)
                r = await c.post(url + "/v1/reload", json={})
                count("reload", r.status_code)
                if r.status_code != 200:
                    failures.append(f"reload: {r.status_code} {r.text[:200]}")

    async def memory():
        t0 = time.monotonic()
        while time.monotonic() < end:
            rss.append((time.monotonic() - t0, rss_mb(pid)))
            await asyncio.sleep(10)

    kinds = [valid] * 8 + [invalid] * 2 + [oversized] + [slow]
    await asyncio.gather(*(client(k) for k in kinds), reloads(), memory())
    first = [m for t, m in rss if t < 60] or [rss[0][1]]
    last = [m for t, m in rss if t > minutes * 60 - 60] or [rss[-1][1]]
    return {"counts": dict(sorted(counts.items())), "failures": failures[:50], "n_failures": len(failures),
            "valid_p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "valid_p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98] if len(latencies) > 100 else None,
            "rss_mb_first_minute": max(first), "rss_mb_last_minute": max(last), "rss_samples": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "soak"))
    ap.add_argument("--json")
    ap.add_argument("--reload-every", type=float, default=60, help="seconds between reloads; 0: none (to tell "
                                                                    "memory a reload keeps from memory traffic keeps)")
    a = ap.parse_args()
    global RELOAD_EVERY
    RELOAD_EVERY = a.reload_every
    run, images = prepare(Path(a.work))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server([sys.executable, "-m", "nnforge.cli", "serve", str(run), "--port", str(port), "--workers",
                           "2", "--allow-reload", "--max-body-mb", "2", "--timeout", "5"], url, ROOT)
    try:
        result = asyncio.run(soak(url, run, images, a.minutes, server.pid))
    finally:
        server.terminate()
        server.wait(60)
    reloads = f"a reload every {a.reload_every:g} s" if a.reload_every else "no reloads"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {a.minutes:g} minutes, --workers 2, {reloads}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for k, v in result["counts"].items():
        print(f"  {k:16s} {v}")
    print(f"valid requests: p50 {result['valid_p50_ms']:.1f} ms, p99 {result['valid_p99_ms']:.1f} ms")
    print(f"server RSS (both workers and the parent): first minute {result['rss_mb_first_minute']:.0f} MB, "
          f"last minute {result['rss_mb_last_minute']:.0f} MB")
    print(f"failures (5xx, dropped or wrong valid answers): {result['n_failures']}", *result["failures"][:10],
          sep="\n  ")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    sys.exit(1 if result["n_failures"] else 0)


if __name__ == "__main__":
    main()
