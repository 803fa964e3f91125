"""Gather concurrent requests into batches for one model that is never used from two threads.

Every model call goes through one queue and one worker thread. Score requests waiting together
are run as one `predictor.score` batch (up to `max_batch` images, all judged against the same references), so
throughput grows with load; generation (describe, chat, streaming) runs one request at a time on the same thread.
The queue is bounded: a request arriving when `max_queue` are waiting is refused at once
(`QueueFull`) instead of piling up memory and latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from PIL import Image

T = TypeVar("T")
_END = object()  # marks the end of a stream on its piece queue


class Scorer(Protocol):
    """The part of `Predictor` the batcher needs."""

    def score(
        self, images: Sequence[Image.Image], question: str | None = None, batch_size: int = 8, reference: Any = None
    ) -> list[float]:
        """p(NG) per image, judged against `reference` (None: the model's own)."""
        ...


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the client should retry later."""


@dataclass
class _Job:
    future: asyncio.Future
    image: Image.Image | None = None  # a score job
    call: Callable[[], Any] | None = None  # a generation job, run alone
    reference: Any = None  # a score job's references (None: the model's own); batched only with the same ones

    @property
    def reference_key(self) -> Any:
        return None if self.reference is None else self.reference.key


@dataclass
class BatchStats:
    """What the worker has done, for /healthz, tests and the load script."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))


class Batcher:
    """One model worker: batches score requests, runs generation requests one by one.

    Create it inside a running event loop (the app's lifespan), then `await close()`.
    """

    def __init__(self, predictor: Scorer, max_batch: int, max_queue: int, timeout_s: float):
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.stats = BatchStats()
        self._pending: deque[_Job] = deque()
        self._has_work = asyncio.Event()
        # One thread: the model is never entered from two threads at once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-inspect-model")
        self._worker = asyncio.get_running_loop().create_task(self._work())

    @property
    def waiting(self) -> int:
        """Requests queued and not yet handed to the model."""
        return len(self._pending)

    async def score(self, image: Image.Image, reference: Any = None) -> float:
        """p(NG) of one image judged against `reference` (None: the model's own references), computed in a batch with
        whatever else waiting is judged against the same.

        Raises:
            QueueFull: `max_queue` requests are already waiting.
            asyncio.TimeoutError: no result within `timeout_s` of arriving.
        """
        job = self._submit(_Job(asyncio.get_running_loop().create_future(), image=image, reference=reference))
        return await self._wait(job.future)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` (a generation) on the model thread, after the requests queued before it.

        Raises:
            QueueFull: `max_queue` requests are already waiting.
            asyncio.TimeoutError: no result within `timeout_s` of arriving.
        """
        job = self._submit(_Job(asyncio.get_running_loop().create_future(), call=fn))
        return await self._wait(job.future)

    async def stream(self, make_pieces: Callable[[], Iterator[str]]) -> AsyncGenerator[str, None]:
        """Text pieces of a streamed generation, as the model thread produces them.

        The generation stops at the next piece when the consumer stops reading (a client that
        hangs up) or when `timeout_s` has passed since the request arrived.

        Raises:
            QueueFull: `max_queue` requests are already waiting (on the first piece).
            asyncio.TimeoutError: the stream did not finish within `timeout_s`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        pieces: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                for piece in make_pieces():
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(pieces.put_nowait, piece)
            except Exception as err:  # handed to the consumer, which raises it in its task
                loop.call_soon_threadsafe(pieces.put_nowait, err)
            loop.call_soon_threadsafe(pieces.put_nowait, _END)

        job = self._submit(_Job(loop.create_future(), call=produce))
        try:
            while True:
                item = await asyncio.wait_for(pieces.get(), max(deadline - loop.time(), 0))
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()
            job.future.cancel()  # skipped by the worker if it has not started yet

    async def close(self) -> None:
        """Stop the worker; requests still waiting fail, a running model call is abandoned."""
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        while self._pending:
            self._pending.popleft().future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _submit(self, job: _Job) -> _Job:
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} requests are waiting (max_queue={self.max_queue})")
        self._pending.append(job)
        self._has_work.set()
        return job

    async def _wait(self, future: asyncio.Future) -> Any:
        # wait_for cancels the future on timeout, so the worker skips it if it has not started.
        return await asyncio.wait_for(future, self.timeout_s)

    async def _work(self) -> None:
        while True:
            await self._has_work.wait()
            job = self._pending.popleft()
            if not self._pending:
                self._has_work.clear()
            if job.future.done():  # timed out or abandoned while waiting
                continue
            if job.call is not None:
                await self._run_call(job)
            else:
                await self._run_scores([job, *self._take_scores(self.max_batch - 1, job.reference_key)])

    def _take_scores(self, n: int, reference_key: Any = None) -> list[_Job]:
        """Up to n more waiting score jobs judged against the same references; the others keep their place."""
        taken, kept = [], deque()
        while self._pending:
            job = self._pending.popleft()
            if job.future.done():
                continue
            if job.call is None and job.reference_key == reference_key and len(taken) < n:
                taken.append(job)
            else:
                kept.append(job)
        self._pending = kept
        if not kept:
            self._has_work.clear()
        return taken

    async def _run_call(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, job.call)
        except Exception as err:
            _settle(job.future, error=err)
        else:
            _settle(job.future, result=result)

    async def _run_scores(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        images, reference = [job.image for job in jobs], jobs[0].reference
        try:
            scores = await loop.run_in_executor(
                self._executor, lambda: self.predictor.score(images, batch_size=len(images), reference=reference)
            )
            if len(scores) != len(jobs):
                raise RuntimeError(f"the model returned {len(scores)} scores for {len(jobs)} images")
        except Exception as err:
            for job in jobs:
                _settle(job.future, error=err)
            return
        self._record(len(jobs))
        for job, p in zip(jobs, scores, strict=True):
            _settle(job.future, result=float(p))

    def _record(self, size: int) -> None:
        self.stats.batches += 1
        self.stats.images += size
        self.stats.largest_batch = max(self.stats.largest_batch, size)
        self.stats.batch_sizes.append(size)


def _settle(future: asyncio.Future, result: Any = None, error: Exception | None = None) -> None:
    """Resolve a future unless its request already gave up (timeout, hang-up)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
