"""Run reductions on one background thread, in submission order.

Collectives must be issued in the same order on every rank (gloo and NCCL match them by
sequence). Chaining a second collective from a Future callback breaks that: callbacks run on
engine threads whenever the first stage completes, so two buckets' stages can interleave
differently on different ranks and mix their data. Instead, front ends submit each bucket's
whole reduction here: one thread runs them first-in first-out (DDP submits buckets in index
order on every rank), while the caller's thread goes on with the backward pass.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import torch


class OrderedExecutor:
    """A single daemon worker thread; :meth:`submit` returns a ``torch.futures.Future``."""

    def __init__(self, name: str = "commpress-comm"):
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], torch.Tensor]) -> torch.futures.Future:
        future: torch.futures.Future = torch.futures.Future()
        self._jobs.put((fn, future))
        return future

    def _loop(self):
        while True:
            fn, future = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as exc:  # surfaces in the waiting thread, e.g. DDP's backward
                future.set_exception(exc)
