"""The queue between handlers and the model: requests that arrive within a few milliseconds of
each other (and share a key: the same decoding settings) become one batch, run in the model's
own thread so the event loop keeps answering."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("llmkit")


@dataclass
class Job:
    item: Any
    key: Hashable
    future: asyncio.Future[Any]


class Batcher:
    """`submit` an item, get its result; `work(key, items)` runs once per batch."""

    def __init__(self, work: Callable[[Any, list[Any]], list[Any]], max_batch_size: int,
                 wait_s: float):
        self.work, self.size, self.wait = work, max_batch_size, wait_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        # one thread: the model runs one batch at a time, and torch parallelizes inside it
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="llmkit-model")
        self.busy = False
        self.requests = self.batches = 0  # for /info: how well requests batch
        self.cancelled = 0  # requests given up (their client left) before their answer
        self.waiting = 0  # requests submitted and not yet answered (queued or in the model)

    async def submit(self, item: Any, key: Hashable = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting += 1
        try:
            await self.queue.put(Job(item, key, future))
            return await future
        finally:
            self.waiting -= 1

    async def run(self) -> None:
        """Gather and run batches until cancelled."""
        pending: list[Job] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
            await self.gather(pending)
            key = pending[0].key
            batch = [j for j in pending if j.key == key][:self.size]
            pending = [j for j in pending if all(j is not b for b in batch)]
            live = [j for j in batch if not j.future.done()]  # a client that left is skipped
            self.cancelled += len(batch) - len(live)
            if live:
                await self.run_batch(live)

    async def gather(self, pending: list[Job]) -> None:
        """Add what arrives within the wait (or is queued already) until the first job's batch
        is full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        key = pending[0].key
        while sum(j.key == key for j in pending) < self.size:
            left = deadline - loop.time()
            if left <= 0 and self.queue.empty():
                return
            try:  # wait_for with no time left would cancel the get before it runs
                pending.append(self.queue.get_nowait() if left <= 0 else
                               await asyncio.wait_for(self.queue.get(), left))
            except (TimeoutError, asyncio.QueueEmpty):
                return

    async def run_batch(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        self.busy = True
        self.requests, self.batches = self.requests + len(jobs), self.batches + 1
        try:
            results = await loop.run_in_executor(self.executor, self.work, jobs[0].key,
                                                 [j.item for j in jobs])
        except Exception as err:  # the batch's requests answer with it; the server goes on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        finally:
            self.busy = False
            self.cancelled += sum(job.future.cancelled() for job in jobs)
        for job, result in zip(jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
