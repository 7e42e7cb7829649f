"""mpi4py front end: compressed mean-reductions of numpy arrays and CPU torch tensors.

The same collective algorithms as the DDP hook (:mod:`commpress.comm.collectives`), over an
MPI transport. Launch with ``mpirun`` (as root add ``--allow-run-as-root``; more ranks than
cores need ``--oversubscribe``)::

    from mpi4py import MPI
    import commpress as cp, commpress.mpi as cpmpi
    mean = cpmpi.allreduce(MPI.COMM_WORLD, array, cp.QSGD(bits=4))

For training, a :class:`GradientReducer` averages a model's gradients step after step, as
the DDP hook does (the calibrated policy by default, error feedback, statistics,
checkpoints)::

    reducer = cpmpi.GradientReducer(MPI.COMM_WORLD, "qsgd4+ef")
    loss.backward(); reducer.allreduce_gradients(model.parameters()); opt.step()

:func:`allreduce_gradients` is the one-call form that applies a codec as given.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Union

import numpy as np
import torch

from .codecs import Codec, saturating_cast
from .comm.agreement import agree
from .comm.calibration import CALIBRATED
from .comm.collectives import Channel
from .comm.pipeline import Layout, reduce_gradient
from .comm.segments import Segments
from .comm.transport import Transport, operation_timeout, wait_until
from .config import CompressionConfig
from .engine.averaging import Group
from .engine.reduction import buckets, split_segments
from .engine.runtime import Runtime
from .engine.state import EngineState
from .names import codec_of
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

    device = torch.device("cpu")

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
    mean = reduce_gradient(flat, Layout([name], sizes=[flat.numel()]),
                           Channel(codec, transport, generator, stats), collective=collective,
                           feedback=error_feedback, agreed=True)
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
        reduce_gradient(Segments([g.view(-1) for g in grads]), Layout(params),
                        Channel(codec, transport, generator, stats), collective=collective,
                        feedback=error_feedback, agreed=True)
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    mean = reduce_gradient(flat, Layout(params), Channel(codec, transport, generator, stats),
                           collective=collective, feedback=error_feedback, agreed=True)
    for p, part in zip(params, mean.split([p.numel() for p in params])):
        p.grad.copy_(saturating_cast(part, p.grad.dtype).view_as(p.grad))


class GradientReducer(EngineState):
    """Averages a model's gradients over the ranks of ``comm``, step after step, through the
    reduction engine (:mod:`commpress.engine.reduction`): what the DDP hook's
    :class:`~commpress.CompressionState` does, over MPI. Call :meth:`allreduce_gradients`
    after every backward, on every rank, with the same parameters.

    Args:
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
        codec: a :class:`~commpress.Codec` or a hook name such as ``"qsgd4+ef"``.
        policy: ``"calibrated"`` (default): per group, MPI's fp32 all-reduce or the codec,
            whichever measures fastest (timed in step 1, then over trial steps; fp16 sums
            travel as fp32 over Open MPI, so fp16 never wins here); ``"fixed"``: the codec on
            every group from step ``start_iter`` on.
        error_feedback, server_feedback, collective, seed, min_numel, recalibrate_every,
        plan: as :class:`~commpress.CompressionState`'s.
        bucket_cap_mb: gradients are reduced in groups of at most this many MB.

    :attr:`stats`, :attr:`plan`, :meth:`state_dict` / :meth:`load_state_dict` (this rank's:
    save one per rank) work as the DDP state's.
    """

    def __init__(self, comm=None, codec: Union[Codec, str] = "qsgd4", *,
                 error_feedback: Optional[str] = None, server_feedback: bool = False,
                 collective: str = "auto", seed: int = 0, policy: str = CALIBRATED,
                 start_iter: int = 0, min_numel: int = 1024, recalibrate_every: int = 1000,
                 plan=None, bucket_cap_mb: float = 25):
        codec, error_feedback = codec_of(codec, error_feedback)
        super().__init__(codec, collective, error_feedback, server_feedback, seed, policy,
                         start_iter, min_numel, recalibrate_every, plan)
        buckets([], bucket_cap_mb)  # refuses a bad capacity now
        self.bucket_cap_mb = bucket_cap_mb
        self.runtime = Runtime(MPITransport(comm), inline=True)  # MPI calls block here
        self._layout: Optional[tuple] = None
        self._groups: List[List[torch.Tensor]] = []
        self._segments: List[tuple] = []

    _runtime = property(lambda self: self.runtime)

    def _learn(self, params: List[torch.Tensor]) -> None:
        """Group ``params`` (again, when they changed) and name them for the memories; every
        rank checks that all have the same configuration and layout."""
        layout = tuple(id(p) for p in params)
        if layout == self._layout:
            return
        if any(p.is_complex() for p in params):
            raise TypeError("commpress.mpi.GradientReducer reduces real gradients; parameters "
                            f"of shapes {[list(p.shape) for p in params if p.is_complex()]} are "
                            "complex (their imaginary parts would be lost)")
        self._groups = buckets(params, self.bucket_cap_mb)
        order = {p: i for i, p in enumerate(params)}
        self._segments = [split_segments(g, self.min_numel, order) for g in self._groups]
        if self.feedback is not None:
            self.feedback.bind((f"param.{i}", p) for i, p in enumerate(params))
        agree(self.runtime.control, {"call": "GradientReducer", **self._agreement_fields(),
                                     "groups": [[list(p.shape) for p in g] for g in self._groups]})
        self._layout = layout

    def allreduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each parameter's ``.grad`` by its mean over ranks (a missing gradient counts
        as zeros and is then set). A group that fails raises here, on every rank."""
        params = [p for p in parameters if p.requires_grad]
        self._learn(params)
        engine, count = self.engine, len(self._groups)
        for index, (group, (small, big)) in enumerate(zip(self._groups, self._segments)):
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in group]
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            mean = engine.issue(self.runtime, index, index == count - 1, Group(flat, small, big),
                                compress=engine.iter >= self.start_iter).wait()
            for p, part in zip(group, mean.split([p.numel() for p in group])):
                if p.grad is None:
                    p.grad = saturating_cast(part, p.dtype).view_as(p)
                else:
                    p.grad.copy_(saturating_cast(part, p.grad.dtype).view_as(p.grad))
