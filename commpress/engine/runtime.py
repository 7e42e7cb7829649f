"""What a front end needs to communicate, created eagerly and released once: private process
groups, the ordered worker thread, CUDA side streams.

A front end keeps its :class:`Runtime` in a one-element list that only it references, and
registers :func:`close_when_collected` on that list with ``weakref.finalize``: a dropped state
then releases its groups and thread on a thread where that is safe.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from ..comm.ordered import OrderedExecutor
from ..comm.transport import HierarchicalTransport, TorchTransport, Transport, destroyable

#: backends whose buckets are reduced inline, in the hook, on the caller's current stream:
#: NCCL's collectives are asynchronous on the GPU already, and issuing them from the backward
#: thread keeps them in the same order as DDP's own on every rank (two communicators used from
#: two threads could interleave differently per rank and deadlock)
INLINE_BACKENDS = ("nccl",)


class Runtime:
    """What a state needs to communicate: a transport (for torch.distributed, over a private
    copy of its group, and the node groups of the hierarchical collective), its ordered worker
    thread (backends that block, such as gloo, Horovod's and MPI's waits) and one side stream
    per CUDA device for that thread. Holds no reference to the state, so a dropped state is
    collected and :meth:`close` releases all."""

    def __init__(self, transport: Transport, control: Optional[Transport] = None,
                 inline: Optional[bool] = None):
        self.transport = transport
        #: where ranks agree on what they reduce: a gloo group on the CPU beside NCCL, so that
        #: the check costs no device->host copy (``transport`` itself otherwise)
        self.control = control or transport
        self.compressed_transport: Transport = transport
        #: the torch.distributed groups this runtime destroys when closed
        self.groups = [t.group for t in (transport, control) if isinstance(t, TorchTransport)]
        #: reduce on the issuing thread (default: for the :data:`INLINE_BACKENDS`)
        self.inline = inline if inline is not None else (
            isinstance(transport, TorchTransport)
            and dist.get_backend(transport.group) in INLINE_BACKENDS)
        self.executor = None if self.inline and inline is not None else OrderedExecutor()
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}

    @property
    def hierarchical(self) -> bool:
        """Whether the compressed reductions are node-aware (several nodes of several ranks)."""
        return isinstance(self.compressed_transport, HierarchicalTransport)

    def side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def run(self, reduce: Callable[[], torch.Tensor],
            device: torch.device) -> torch.futures.Future:
        """A future of ``reduce()`` (a group's reduction, the tensors it reads written on
        ``device``'s current stream): inline on that stream for the inline backends (the
        future is CUDA-aware), else on the worker thread, in submission order, on the device's
        side stream after the work queued so far."""
        cuda = [device] if device.type == "cuda" else None
        if self.inline:  # queued on this stream, in the front end's order
            done = torch.futures.Future(devices=cuda) if cuda else torch.futures.Future()
            done.set_result(reduce())
            return done
        if cuda:
            reduce = _on_side_stream(reduce, self.side_stream(device), device)
        return self.executor.submit(reduce, devices=cuda)

    def all_reduce_mean(self, buffer: torch.Tensor, wire: torch.dtype,
                        stats=None) -> torch.futures.Future:
        """A future of ``buffer`` holding its mean over ranks: divided by W, cast to ``wire``,
        one asynchronous all-reduce of the transport issued here (as DDP's and Horovod's own
        default is, not on the worker thread), cast back into ``buffer`` when it ends. Its
        communication time goes into ``stats`` (on the CPU). The callback runs on the
        backend's thread and holds no front end's state: were it the last reference, the
        state's finalizer would destroy the group from that group's own thread ("Resource
        deadlock avoided", and the process aborts)."""
        w = self.transport.world_size
        send = buffer.div_(w) if buffer.dtype == wire else buffer.div_(w).to(wire)  # pre-divided
        issued = time.perf_counter()
        pending = self.transport.all_reduce_sum_start(send)

        def finish(reduced: torch.futures.Future) -> torch.Tensor:
            reduced.value()  # raises the all-reduce's failure (a dead or hung peer)
            if stats is not None and not buffer.is_cuda:  # on a GPU the clock sees its launch
                stats.add(comm_seconds=time.perf_counter() - issued)
            if send is not buffer:
                buffer.copy_(send)
            return buffer
        return pending.future(self.executor).then(finish)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
        for group in self.groups:
            if dist.is_available() and dist.is_initialized() and destroyable(group):
                try:
                    dist.destroy_process_group(group)
                except (RuntimeError, ValueError, KeyError):  # already gone with the world
                    pass
        self.groups = []


def _on_side_stream(reduce, stream: "torch.cuda.Stream", device: torch.device):
    """``reduce`` for the worker thread: on ``stream``, after the work queued so far on the
    caller's current stream, finished before it returns."""
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))

    def run():
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            result = reduce()
        stream.synchronize()  # the worker may block; the issuing thread does not
        return result
    return run


def close_when_collected(box: list) -> None:
    """A dropped state's finalizer, given the one-element list that holds its runtime.

    The cyclic collector, or a callback holding the last reference, may run it on a gloo
    thread of the very group it owns; a group destroyed or freed there joins that thread
    ("Resource deadlock avoided": the process aborts). So off the main thread the runtime
    is moved to a thread of its own, which closes it and drops the last reference to it
    (this thread keeps none: the box is emptied, the queue hands it over). That thread is
    not a daemon, so the interpreter waits for it before finalizing: a daemon still inside
    a group's destructor then is killed when it takes the GIL back, unwinding through C++
    that must not throw ("terminate called without an active exception", SIGABRT at exit).
    Once the main thread has finished, a new thread would not be waited for: a thread of
    Python's own (the worker) then closes it itself; only a C++ thread still hands it off."""
    if not box:
        return
    here, main = threading.current_thread(), threading.main_thread()
    foreign = isinstance(here, threading._DummyThread)  # e.g. gloo's, maybe the group's own
    if here is main or not (main.is_alive() or foreign):
        box.pop().close()
        return
    handoff: queue.SimpleQueue = queue.SimpleQueue()
    handoff.put(box.pop())
    threading.Thread(target=_close_handed_off, args=(handoff,), name="commpress-release",
                     daemon=False).start()


def _close_handed_off(handoff: queue.SimpleQueue) -> None:
    handoff.get().close()
