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
import weakref
from typing import Callable, List, Optional

import torch


def _stop(jobs: "queue.SimpleQueue", thread: threading.Thread) -> None:
    jobs.put(None)  # runs after the jobs already queued
    if thread is not threading.current_thread():
        thread.join(timeout=10)


def _unwrap(outcome: torch.futures.Future):
    value, error = outcome.value()
    if error is not None:
        raise error
    return value


class OrderedExecutor:
    """A single daemon worker thread; :meth:`submit` returns a ``torch.futures.Future``.

    The thread is stopped when the executor is garbage collected or, at the latest, at
    interpreter exit, before the communication libraries tear down."""

    def __init__(self, name: str = "commpress-comm"):
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, args=(self._jobs,), name=name,
                                        daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, _stop, self._jobs, self._thread)

    def shutdown(self) -> None:
        """Stop the thread once the jobs already submitted have run."""
        self._stop()

    def submit(self, fn: Callable[[], torch.Tensor],
               devices: Optional[List[torch.device]] = None) -> torch.futures.Future:
        """The Future of ``fn()``. An exception in ``fn`` is raised inside a ``then`` callback,
        which is how an error reaches C++ consumers such as DDP's reducer with its message
        (``Future.set_exception`` only works for Python callers of ``wait()``). ``devices``:
        the CUDA devices of the result, making the future CUDA-aware as ProcessGroupNCCL's
        are (``fn`` must have finished its GPU work, or made the current stream wait for it)."""
        outcome: torch.futures.Future = (torch.futures.Future(devices=devices) if devices
                                         else torch.futures.Future())
        self._jobs.put((fn, outcome))
        return outcome.then(_unwrap)

    @staticmethod
    def _loop(jobs):  # holds no reference to the executor, so it can be collected
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, outcome = job
            del job
            try:
                result = (fn(), None)
            except BaseException as exc:  # noqa: B902 - every failure must complete the future
                result = (None, exc)  # and surfaces in the waiting thread, e.g. DDP's backward
            # drop the job's closure before its future wakes the waiter: a waiter that then
            # drops its model (a script ending) would leave this thread the state's last
            # reference, so the state would die here, maybe as the interpreter shuts down; and
            # kept until the next job, it would keep the state (and its bucket) alive
            del fn
            outcome.set_result(result)
            del outcome, result
