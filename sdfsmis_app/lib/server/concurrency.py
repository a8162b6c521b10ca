"""A bounded number of inferences at once, a bounded queue, and a clear "busy" beyond it.

Each running inference holds its activations (GPU memory) and each waiting one holds a worker
thread; both are bounded, so that a burst of requests can neither exhaust GPU memory nor the
server's thread pool. A request beyond the queue is refused at once instead of waiting without
end: the client is told how busy the server is and when to retry.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(RuntimeError):
    """The server cannot take this inference now; the message says why."""

    retry_after_s = 5


class InferenceGate:
    def __init__(self, max_running: int, max_waiting: int, timeout_s: float):
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"need max_concurrent_infers >= 1, max_queued_infers >= 0: {max_running}, {max_waiting}")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_running)
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0

    @property
    def running(self) -> int:
        """Inferences admitted and not yet finished (a newly published checkpoint is loaded only
        when no other one uses the shared model)."""
        with self._lock:
            return self._running

    def status(self) -> dict:
        with self._lock:
            return {
                "running": self._running,
                "waiting": self._waiting,
                "max_concurrent_infers": self.max_running,
                "max_queued_infers": self.max_waiting,
            }

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Run now, or wait in the queue (up to ``timeout_s``), or raise :class:`Busy`."""
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self._waiting >= self.max_waiting:
                    raise Busy(
                        f"server busy: {self._running} inference(s) running and {self._waiting} waiting "
                        f"(max_concurrent_infers {self.max_running}, max_queued_infers {self.max_waiting}); "
                        f"retry in a few seconds"
                    )
                self._waiting += 1
            try:
                admitted = self._slots.acquire(timeout=self.timeout_s)
            finally:
                with self._lock:
                    self._waiting -= 1
            if not admitted:
                raise Busy(f"server busy: no inference slot became free within {self.timeout_s:g} s; retry later")
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
            self._slots.release()
