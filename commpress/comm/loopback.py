"""An in-process transport: W ranks as W threads of one process, for fast tests of the
collective algorithms and of front-end logic without process groups or sockets."""
from __future__ import annotations

import threading
from typing import Callable, List

import torch

from .transport import Transport


class LoopbackGroup:
    """The meeting point of ``world_size`` :class:`LoopbackTransport` ranks. Every operation is
    a barrier: each rank posts its tensor, waits for the others, reads what it needs, and waits
    again before the slots are reused. A rank that never arrives fails the others after
    ``timeout`` seconds (``threading.BrokenBarrierError``), instead of hanging the test."""

    def __init__(self, world_size: int, timeout: float = 60.0):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: List = [None] * world_size

    def exchange(self, rank: int, value) -> list:
        """Every rank's ``value``, in rank order."""
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()
        return values

    def run(self, fn: Callable[["LoopbackTransport"], object]) -> list:
        """``[fn(transport of rank r) for every r]``, each rank on its own thread; the first
        exception of any rank is raised here (after the others stopped)."""
        results, errors = [None] * self.world_size, [None] * self.world_size

        def body(rank):
            try:
                results[rank] = fn(LoopbackTransport(self, rank))
            except BaseException as exc:  # noqa: B902 - reported below
                errors[rank] = exc
                self._barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next((e for e in errors if e is not None
                      and not isinstance(e, threading.BrokenBarrierError)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results


class LoopbackTransport(Transport):
    """One rank of a :class:`LoopbackGroup`; byte accounting as for the real engines. Like gloo,
    it refuses an ``all_gather`` of unequal sizes (with a ``RuntimeError``)."""

    def __init__(self, group: LoopbackGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size
        self.sent_bytes = 0

    def all_gather(self, x):
        self._count_all_gather(x)
        parts = self.group.exchange(self.rank, x.detach().clone())
        if len({p.numel() for p in parts}) > 1:
            raise RuntimeError(f"all_gather of unequal sizes {[p.numel() for p in parts]}")
        return torch.cat(parts)

    def all_to_all(self, x, in_splits, out_splits):
        self._count_all_to_all(x, in_splits)
        parts = self.group.exchange(self.rank, list(x.detach().clone().split(list(in_splits))))
        received = [parts[peer][self.rank] for peer in range(self.world_size)]
        if [r.numel() for r in received] != list(out_splits):
            raise RuntimeError(f"all_to_all expected {list(out_splits)} elements, got "
                               f"{[r.numel() for r in received]}")
        return torch.cat(received)

    def all_reduce_sum(self, x):
        self._count_all_reduce(x)
        parts = self.group.exchange(self.rank, x.detach().clone())
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return x.copy_(total)

    def broadcast(self, x, src):
        self._count_broadcast(x, src)
        return x.copy_(self.group.exchange(self.rank, x.detach().clone())[src])
