"""A bounded executor for heavy work (inference, scoring), so the server's event loop never computes.

``workers`` threads run jobs; at most ``queue`` more wait. A submission beyond that raises
``QueueFull`` (the route answers 503 with ``Retry-After``). Threads share the loaded networks
(the inferers cache them), so a burst costs no copies. A waiting job whose client has gone can
be cancelled before it starts. On CPU one worker is the default: one inference already uses
every core through PyTorch's intra-op threads, and more workers would only split them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class QueueFull(RuntimeError):
    """Every worker is busy and the queue is full; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def default_workers() -> int:
    """One worker per visible GPU (at least one); one on CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return max(1, torch.cuda.device_count())
    except Exception:  # pragma: no cover - torch always imports here
        pass
    return 1


class BoundedExecutor:
    """Thread pool with a bounded backlog and per-job timing (see module docstring)."""

    def __init__(self, name: str, workers: int, queue: int) -> None:
        self.name = name
        self.workers = max(1, int(workers))
        self.queue = max(0, int(queue))
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix=f"{name}-worker")
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished (running + waiting)
        self._running = 0
        self._done = 0
        self._dropped = 0  # cancelled before they started (client gone)
        self._recent: list[float] = []  # durations of the last jobs, for Retry-After

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "workers": self.workers,
                "queue_limit": self.queue,
                "running": self._running,
                "waiting": self._pending - self._running,
                "completed": self._done,
                "dropped": self._dropped,
            }

    def _retry_after(self) -> int:
        typical = sorted(self._recent)[len(self._recent) // 2] if self._recent else 5.0
        backlog = (self._pending / self.workers) * typical
        return max(1, min(300, int(round(backlog))))

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)``; ``QueueFull`` when ``workers + queue`` jobs are already pending."""
        with self._lock:
            if self._pending >= self.workers + self.queue:
                raise QueueFull(
                    f"the server is busy: {self._pending} {self.name} requests are running or queued "
                    f"(limit {self.workers} running + {self.queue} queued); retry later",
                    self._retry_after(),
                )
            self._pending += 1

        def run() -> T:
            with self._lock:
                self._running += 1
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._running -= 1
                    self._recent = (self._recent + [time.perf_counter() - start])[-20:]

        future = self._pool.submit(run)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending -= 1
            if future.cancelled():
                self._dropped += 1
            else:
                self._done += 1

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        client_gone: Callable[[], Awaitable[bool]] | None = None,
        poll_s: float = 0.25,
    ) -> T:
        """Run ``fn(*args)`` on a worker and await it without blocking the event loop.

        While the job waits for a worker, ``client_gone()`` is polled; if the client disconnected
        the job is cancelled (it never starts) and ``asyncio.CancelledError`` is raised.
        """
        future = self.submit(fn, *args)
        wrapped = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({wrapped}, timeout=poll_s)
            if done:
                return wrapped.result()
            # a queued job whose client went away is dropped (cancel() fails once it has started)
            if client_gone is not None and not future.running() and await client_gone() and future.cancel():
                logger.info(f"{self.name}: client disconnected; dropped its queued request")
                raise asyncio.CancelledError("client disconnected")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
