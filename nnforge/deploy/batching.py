"""Micro-batching: requests that arrive together share one forward pass.

    batcher = MicroBatcher(max_batch_size=32, max_wait_ms=2, max_queue=256)
    await batcher.start()
    outputs = await batcher.submit(engine, arrays)  # (n, ...) raw outputs; raises QueueFull when over max_queue

One task gathers queued inputs into a batch: everything already waiting (up to max_batch_size), then more for up
to max_wait_ms, but only while other requests are on their way (being received or decoded; the server tells
through `arriving`), so a lone request never waits. The forward pass runs on one dedicated thread, so the event
loop keeps accepting requests, and while one batch runs the next one fills up by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


class QueueFull(RuntimeError):
    """More inputs are waiting than the server accepts; the client should retry later (HTTP 503)."""


@dataclass
class _Item:
    array: np.ndarray
    engine: object  # the Engine whose input kind made `array`; a reload may swap engines mid-queue
    future: asyncio.Future
    queued: float  # loop.time() when it entered the queue


def _infer(engine, arrays: list[np.ndarray]) -> np.ndarray:
    return engine.forward(engine.input.batch(arrays))


class MicroBatcher:
    def __init__(self, max_batch_size: int = 32, max_wait_ms: float = 2.0, max_queue: int = 256,
                 on_batch: Callable[[list[float], float], None] | None = None,
                 arriving: Callable[[], int] | None = None, on_pending: Callable[[int], None] | None = None):
        self.max_batch_size, self.max_wait, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        # for metrics: after every forward pass (each input's seconds in the queue, the pass's seconds), and the
        # new value of `pending` whenever it changes
        self.on_batch, self.on_pending = on_batch, on_pending
        self.arriving = arriving  # requests on their way to submit(); None: always wait up to max_wait_ms
        self.pending = 0  # inputs admitted and not yet answered (queued, batching or running)
        self.requests_in = 0  # submit() calls in progress
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnforge-infer")
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="nnforge-batcher")

    async def stop(self) -> None:
        """Called after the server has drained its requests; anything still queued is failed, not dropped."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RuntimeError("server shutting down"))
        self._pool.shutdown(wait=True)

    async def submit(self, engine, arrays: list[np.ndarray]) -> np.ndarray:
        """Logits (n, K) for n preprocessed inputs. Cancelling the caller (a timeout) withdraws its inputs."""
        if self.pending + len(arrays) > self.max_queue:
            raise QueueFull(f"{self.pending} inputs waiting; the queue holds {self.max_queue}")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in arrays]
        self._add_pending(len(arrays))
        self.requests_in += 1
        try:
            now = loop.time()
            for a, f in zip(arrays, futures, strict=True):
                self._queue.put_nowait(_Item(a, engine, f, now))
            return np.stack(await asyncio.gather(*futures))
        finally:
            self._add_pending(-len(arrays))
            self.requests_in -= 1
            for f in futures:
                f.cancel()  # no-op when answered; otherwise the batcher skips the withdrawn input

    def _add_pending(self, n: int) -> None:
        self.pending += n
        if self.on_pending:
            self.on_pending(self.pending)

    async def _gather(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or (self.arriving is not None and self.arriving() <= 0):
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [it for it in batch if not it.future.done()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            groups: dict[int, list[_Item]] = {}
            for it in batch:  # one forward pass per engine: after a reload old and new inputs may differ in shape
                groups.setdefault(id(it.engine), []).append(it)
            for items in groups.values():
                t0, started = time.perf_counter(), loop.time()
                try:
                    outputs = await loop.run_in_executor(self._pool, _infer, items[0].engine,
                                                        [it.array for it in items])
                except Exception as err:  # a failed forward pass fails its requests, never the batcher
                    for it in items:
                        if not it.future.done():
                            it.future.set_exception(err)
                    continue
                if self.on_batch:
                    self.on_batch([started - it.queued for it in items], time.perf_counter() - t0)
                for it, row in zip(items, outputs, strict=True):
                    if not it.future.done():
                        it.future.set_result(row)
