"""mpi4py front end: compressed mean-reductions of numpy arrays and CPU torch tensors.

The same collective algorithms as the DDP hook (:mod:`commpress.comm.collectives`), over an
MPI transport. Launch with ``mpirun`` (as root add ``--allow-run-as-root``; more ranks than
cores need ``--oversubscribe``)::

    from mpi4py import MPI
    import commpress as cp, commpress.mpi as cpmpi
    mean = cpmpi.allreduce(MPI.COMM_WORLD, array, cp.QSGD(bits=4))

For training, :func:`allreduce_gradients` averages all gradients of a model in one call.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import numpy as np
import torch

from .codecs import Codec, saturating_cast
from .comm.agreement import agree
from .comm.pipeline import reduce_gradient
from .comm.segments import Segments
from .comm.transport import Transport, operation_timeout, wait_until
from .config import CompressionConfig
from .feedback import ErrorFeedback
from .stats import CommStats

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError("commpress.mpi needs mpi4py: pip install 'commpress[mpi]' "
                      "(and an MPI library such as Open MPI)") from exc


class MPITransport(Transport):
    """The transport operations on an mpi4py communicator (CPU tensors only). Half-precision
    sums travel as float32: Open MPI 4.1 rejects float16 reductions (MPI_ERR_TYPE) and has no
    bfloat16 type, so FP16/BF16 save nothing over MPI (the byte count says so).

    Operations are started non-blocking and waited for with a deadline (``timeout``
    seconds, default :func:`~commpress.comm.transport.operation_timeout`): a peer that
    stopped answering raises :class:`TimeoutError` instead of hanging the job. A dead peer
    ends the job through ``mpirun``. MPI cannot cancel a collective, so after a timeout the
    communicator is unusable: end the job."""

    def __init__(self, comm=None, timeout: Optional[float] = None):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.sent_bytes = 0
        self.timeout = timeout if timeout is not None else operation_timeout()

    def _wait(self, request, what: str) -> None:
        if self.timeout is None:
            request.Wait()
        else:
            wait_until(request.Test, self.timeout, f"MPI {what} on rank {self.rank}")

    @staticmethod
    def _buffer(x: torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"the MPI transport moves CPU tensors, got one on {x.device}")
        arr = x.numpy()
        return [arr, MPI._typedict[arr.dtype.char]]

    def all_gather(self, x):
        self._count_all_gather(x)
        out = torch.empty(self.world_size * x.numel(), dtype=x.dtype)
        self._wait(self.comm.Iallgather(self._buffer(x.contiguous()), self._buffer(out)), "allgather")
        return out

    def all_to_all(self, x, in_splits, out_splits):
        self._count_all_to_all(x, in_splits)
        out = torch.empty(sum(out_splits), dtype=x.dtype)
        displs = lambda counts: np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
        send, stype = self._buffer(x.contiguous())
        recv, rtype = self._buffer(out)
        self._wait(self.comm.Ialltoallv([send, (list(in_splits), displs(in_splits)), stype],
                                        [recv, (list(out_splits), displs(out_splits)), rtype]),
                   "alltoallv")
        return out

    def all_reduce_sum(self, x):
        if x.dtype in (torch.float16, torch.bfloat16):
            return x.copy_(self.all_reduce_sum(x.float()))
        self._count_all_reduce(x)
        self._wait(self.comm.Iallreduce(MPI.IN_PLACE, self._buffer(x), op=MPI.SUM), "allreduce")
        return x

    def broadcast(self, x, src):
        self._count_broadcast(x, src)
        self._wait(self.comm.Ibcast(self._buffer(x), root=src), "broadcast")
        return x


_TRANSPORTS = {}


def _transport(comm) -> MPITransport:
    key = comm.py2f()
    if key not in _TRANSPORTS:
        _TRANSPORTS[key] = MPITransport(comm)
    return _TRANSPORTS[key]


def _agree(transport, call, codec, collective, feedback, data, name) -> None:
    """Validate the configuration, then, before every reduction, one 8-byte all-gather: ranks
    passing different codecs, collectives, shapes or dtypes fail with the difference named
    instead of hanging in a size-mismatched collective or averaging mixed formats."""
    config = CompressionConfig(codec, collective, feedback.kind if feedback else None,
                               bool(feedback and feedback.kind == "ef" and feedback.server))
    shape = ({"shape": list(data.shape), "dtype": str(data.dtype)}
             if isinstance(data, torch.Tensor) else {"shapes": data})
    agree(transport, {"call": call, **config.shared(), "name": name, **shape})


def allreduce(comm, x: Union[np.ndarray, torch.Tensor], codec: Codec, collective: str = "auto",
              error_feedback: Optional[ErrorFeedback] = None, name: Optional[str] = None,
              generator: Optional[torch.Generator] = None,
              stats: Optional[CommStats] = None) -> Union[np.ndarray, torch.Tensor]:
    """The mean over the ranks of ``comm`` of ``x`` (a float numpy array or CPU tensor, any
    shape), through ``codec``; same type, shape and dtype as ``x``.

    ``error_feedback``: an :class:`~commpress.feedback.ErrorFeedback` kept by the caller across
    calls, with a ``name`` per reduced quantity. ``generator``: seed it per rank (e.g. from
    ``comm.Get_rank()``) so rounding noise is independent across ranks.
    """
    is_numpy = isinstance(x, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else x
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
        raise TypeError(f"commpress.mpi.allreduce reduces float arrays or tensors, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if error_feedback is not None and name is None:
        raise ValueError("error feedback needs a name for the quantity being reduced")
    transport = _transport(comm)
    _agree(transport, "allreduce", codec, collective, error_feedback, tensor, name)
    flat = tensor.detach().reshape(-1)
    mean = reduce_gradient(flat, [name], codec, transport, collective, error_feedback,
                       generator, stats, sizes=[flat.numel()], agreed=True)
    out = saturating_cast(mean, tensor.dtype).view(tensor.shape)
    return out.numpy() if is_numpy else out


def allreduce_gradients(comm, parameters: Iterable[torch.nn.Parameter], codec: Codec,
                        collective: str = "auto", error_feedback: Optional[ErrorFeedback] = None,
                        generator: Optional[torch.Generator] = None,
                        stats: Optional[CommStats] = None) -> None:
    """Replace each ``param.grad`` by its mean over ranks: all gradients go through the codec
    as one flat vector (one collective per call); error-feedback memories are per parameter."""
    params = [p for p in parameters if p.grad is not None]
    if any(p.is_complex() for p in params):
        raise TypeError("commpress.mpi.allreduce_gradients reduces real gradients; parameters "
                        f"of shapes {[list(p.shape) for p in params if p.is_complex()]} are "
                        "complex (their imaginary parts would be lost): reduce "
                        "torch.view_as_real(param.grad) with allreduce instead")
    transport = _transport(comm)
    _agree(transport, "allreduce_gradients", codec, collective, error_feedback,
           [tuple(p.shape) for p in params], None)
    if not params:
        return
    grads = [p.grad.detach() for p in params]
    if all(g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        # reduced where they lie, without a concatenated copy (see comm.segments)
        reduce_gradient(Segments([g.view(-1) for g in grads]), params, codec, transport,
                        collective, error_feedback, generator, stats, agreed=True)
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    mean = reduce_gradient(flat, params, codec, transport, collective, error_feedback,
                           generator, stats, agreed=True)
    for p, part in zip(params, mean.split([p.numel() for p in params])):
        p.grad.copy_(saturating_cast(part, p.grad.dtype).view_as(p.grad))
