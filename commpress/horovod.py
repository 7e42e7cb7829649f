"""Horovod front end: the same codecs and collective algorithms over Horovod's operations.

Build Horovod with ``launch/install_horovod.sh`` and run with ``horovodrun``::

    import horovod.torch as hvd, commpress as cp, commpress.horovod as cphvd
    hvd.init()
    opt = cphvd.DistributedOptimizer(opt, model.named_parameters(), codec=cp.QSGD(bits=4))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    horovodrun -np 4 -H host1:2,host2:2 --gloo python train.py

:func:`DistributedOptimizer` takes ``hvd.DistributedOptimizer``'s arguments with their
meaning, and like it reduces gradients during the backward pass, group by group, as they
become ready.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from .codecs import FP16, Codec, Identity, saturating_cast
from .comm.agreement import agree
from .comm.calibration import CALIBRATED
from .comm.collectives import Channel
from .comm.pipeline import Layout, reduce_gradient
from .comm.transport import Pending, Transport, operation_timeout, wait_until
from .config import CompressionConfig
from .engine.averaging import Group
from .engine.reduction import buckets, split_segments
from .engine.runtime import Runtime
from .engine.state import EngineState
from .names import codec_of
from .stats import CommStats

try:
    import horovod.torch as hvd
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError("commpress.horovod needs Horovod with PyTorch support: "
                      "bash launch/install_horovod.sh") from exc


class _HorovodPending(Pending):
    """A started Horovod operation: ``wait()`` synchronizes its handle once it is done, or
    raises :class:`TimeoutError` past :func:`~commpress.comm.transport.operation_timeout`
    (Horovod waits forever on a peer that stopped answering)."""

    def __init__(self, handle, what: str):
        super().__init__(None, handle)
        self.what = what

    def wait(self) -> torch.Tensor:
        if self.output is None:
            wait_until(lambda: hvd.poll(self.work), operation_timeout(), f"Horovod {self.what}")
            out = hvd.synchronize(self.work)
            self.output = out[0] if isinstance(out, tuple) else out  # alltoall: (output, splits)
        return self.output


class HorovodTransport(Transport):
    """The transport operations on Horovod (after ``hvd.init()``). Horovod matches operations
    across ranks by name: each transport names its operations ``{prefix}.{sequence number}``,
    so ranks that issue them in the same order (the front ends ensure it) match, whatever
    other, differently named, Horovod operations other threads run meanwhile.
    bfloat16 sums (unsupported by Horovod) travel as float32."""

    device = torch.device("cpu")  # where its own (control) tensors live

    def __init__(self, prefix: str):
        self.rank, self.world_size = hvd.rank(), hvd.size()
        self.sent_bytes = 0
        self._prefix, self._sequence = prefix, itertools.count()

    def _name(self, op: str) -> str:
        return f"{self._prefix}.{op}.{next(self._sequence)}"

    def all_gather(self, x):
        return self.all_gather_start(x).wait()

    def all_gather_start(self, x):
        self._count_all_gather(x)
        name = self._name("allgather")
        return _HorovodPending(hvd.allgather_async(x, name=name), name)

    def all_to_all(self, x, in_splits, out_splits):
        return self.all_to_all_start(x, in_splits, out_splits).wait()

    def all_to_all_start(self, x, in_splits, out_splits):
        self._count_all_to_all(x, in_splits)
        name = self._name("alltoall")
        return _HorovodPending(hvd.alltoall_async(x, splits=torch.tensor(in_splits, dtype=torch.int32),
                                                  name=name), name)

    def all_reduce_sum(self, x):
        return self.all_reduce_sum_start(x).wait()

    def all_reduce_sum_start(self, x):
        if x.dtype == torch.bfloat16:
            return Pending(x.copy_(self.all_reduce_sum(x.float())))
        self._count_all_reduce(x)
        name = self._name("allreduce")
        return _HorovodPending(hvd.allreduce_async_(x, op=hvd.Sum, name=name), name)

    def broadcast(self, x, src):
        self._count_broadcast(x, src)
        name = self._name("broadcast")
        return x.copy_(_HorovodPending(hvd.broadcast_async(x, root_rank=src, name=name), name).wait())


_TRANSPORT: Optional[HorovodTransport] = None
#: numbers the optimizers of this process; every rank creates them in the same order, so the
#: k-th optimizer's operations carry the same names on every rank
_OPTIMIZERS = itertools.count()


def _transport() -> HorovodTransport:
    global _TRANSPORT
    if _TRANSPORT is None or _TRANSPORT.world_size != hvd.size():
        _TRANSPORT = HorovodTransport("commpress.allreduce")
    return _TRANSPORT


def allreduce(tensor: torch.Tensor, codec: Codec, collective: str = "auto",
              generator: Optional[torch.Generator] = None,
              stats: Optional[CommStats] = None) -> torch.Tensor:
    """The mean over Horovod ranks of ``tensor`` through ``codec`` (same shape and dtype).
    Call it from one thread, in the same order on every rank."""
    transport = _transport()
    agree(transport, {"call": "allreduce", **CompressionConfig(codec, collective).shared(),
                      "shape": list(tensor.shape), "dtype": str(tensor.dtype)})
    mean = reduce_gradient(tensor.detach().reshape(-1), Layout([None]),
                           Channel(codec, transport, generator, stats), collective=collective,
                           agreed=True)
    return saturating_cast(mean, tensor.dtype).view(tensor.shape)


def _codec_for(codec: Optional[Codec], compression) -> Codec:
    """``codec``, or the commpress equivalent of Horovod's ``compression``."""
    given = compression is not None and compression is not hvd.Compression.none
    if codec is not None:
        if given:
            raise ValueError("pass codec= or compression=, not both (codec= is commpress's)")
        return codec
    if compression is hvd.Compression.fp16:
        return FP16()
    if given:
        raise ValueError(f"compression={getattr(compression, '__name__', compression)!r} is a "
                         "Horovod compressor, which commpress does not run: pass codec= instead "
                         "(e.g. commpress.QSGD(bits=4)); hvd.Compression.none and "
                         "hvd.Compression.fp16 are accepted and mean fp32 and commpress.FP16()")
    if compression is None:
        warnings.warn("commpress.horovod.DistributedOptimizer without codec=: gradients are "
                      "averaged in fp32 (pass e.g. codec=commpress.QSGD(bits=4) to compress)",
                      stacklevel=3)
    return Identity()


def _groups(params: List[torch.Tensor], groups, num_groups: int,
            bucket_cap_mb: float) -> List[List[torch.Tensor]]:
    """The reduction groups, in the order they are sent: Horovod's ``groups`` (lists of
    parameters, each reduced together; the rest follow in buckets), ``num_groups`` (that many
    groups of consecutive parameters), or DDP-like buckets of ``bucket_cap_mb``
    (:func:`~commpress.engine.reduction.buckets`). Parameters go in reverse order, the order
    in which backward produces their gradients."""
    order = list(reversed(params))
    if isinstance(groups, int):  # Horovod's older spelling of num_groups
        groups, num_groups = None, groups
    if groups is not None:
        explicit = [list(g) for g in groups]
        listed = {id(p) for g in explicit for p in g}
        if len(listed) != sum(len(g) for g in explicit):
            raise ValueError("groups: a parameter is in more than one group")
        if not listed <= {id(p) for p in params}:
            raise ValueError("groups: a parameter is not one of the optimizer's (with "
                             "requires_grad=True)")
        return [g for g in explicit if g] + _groups([p for p in params if id(p) not in listed],
                                                    None, 0, bucket_cap_mb)
    if num_groups:
        if num_groups < 0:
            raise ValueError(f"num_groups must be >= 0, got {num_groups}")
        size = -(-len(order) // num_groups)
        return [order[i:i + size] for i in range(0, len(order), size)]
    return buckets(params, bucket_cap_mb)


class HorovodCompression(EngineState):
    """The compression state of a :func:`DistributedOptimizer` (``opt.compression``): its
    statistics (``stats``, also ``opt.comm_stats``), the calibrated policy's ``plan``
    (``save_plan``), and this rank's checkpoint (``state_dict()`` / ``load_state_dict()``:
    step, generators, error-feedback memories, plan), beside the optimizer's own."""

    def __init__(self, codec: Codec, **settings):
        super().__init__(codec, **settings)
        self.runtime = Runtime(HorovodTransport(f"commpress.opt{next(_OPTIMIZERS)}"))

    _runtime = property(lambda self: self.runtime)


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the wrapped optimizer's class, as ``hvd.DistributedOptimizer`` does.

    A hook on every parameter counts its backward passes; when the last pass of a step has
    produced every gradient of a group, and every group before it has been started, the
    group's gradients are copied into one vector and handed to the engine
    (:mod:`commpress.engine.reduction`), which reduces groups on a worker thread, one after
    another, in group order on every rank (so Horovod's operations match), while backward goes
    on. ``synchronize()`` starts the groups whose gradients did not all arrive (zeros for
    missing gradients), waits for all, and writes the means back."""

    def _commpress_init(self, named_parameters, compression: HorovodCompression, op, groups,
                        sparse_as_dense, backward_passes_per_step):
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be >= 1")
        named = list(named_parameters) if named_parameters is not None else []
        names = {p: n for n, p in named}
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        unnamed = [p for p in params if p not in names]
        if named and unnamed:
            raise ValueError(f"named_parameters misses {len(unnamed)} of the optimizer's parameters")
        self.compression = compression
        self.comm_stats = compression.stats
        self._cp_params, self._cp_groups = params, groups
        self._cp_group_of = {p: i for i, group in enumerate(groups) for p in group}
        order = {p: i for i, p in enumerate(params)}
        self._cp_segments = [split_segments(g, compression.min_numel, order) for g in groups]
        self._cp_op = op
        self._cp_sparse_as_dense = sparse_as_dense
        if compression.feedback is not None:
            compression.feedback.bind([(names.get(p, f"param.{i}"), p) for i, p in enumerate(params)])
        self._cp_passes = backward_passes_per_step
        self._cp_skip = False
        self._cp_reset()
        self._cp_synchronized = False
        runtime = compression.runtime  # every rank constructs its optimizers in the same order
        agree(runtime.control, {"call": "DistributedOptimizer", **compression._agreement_fields(),
                                "op": op, "passes": backward_passes_per_step,
                                "groups": [[list(p.shape) for p in g] for g in groups]})
        for p in params:  # count backward passes, as Horovod's hooks do
            p.register_post_accumulate_grad_hook(self._cp_on_grad)

    def _cp_reset(self):
        self._cp_counts = {p: 0 for p in self._cp_params}
        self._cp_missing = [len(g) for g in self._cp_groups]  # gradients not final yet
        self._cp_started: List[Tuple[List[torch.Tensor], torch.futures.Future]] = []

    def _cp_on_grad(self, param):
        self._cp_counts[param] += 1
        if self._cp_counts[param] > self._cp_passes:
            raise RuntimeError(f"gradients were computed more than backward_passes_per_step="
                               f"{self._cp_passes} times before step(); call step() or "
                               "zero_grad() in between, or raise backward_passes_per_step")
        if self._cp_counts[param] == self._cp_passes:
            self._cp_missing[self._cp_group_of[param]] -= 1
            self._cp_start_ready()

    def _cp_start_ready(self, every: bool = False):
        """Start the groups whose gradients are final (``every``: all), in group order."""
        compression = self.compression
        engine, runtime = compression.engine, compression.runtime
        while len(self._cp_started) < len(self._cp_groups):
            index = len(self._cp_started)
            if not every and self._cp_missing[index]:
                return
            group = self._cp_groups[index]
            flat = torch.cat([self._cp_grad(p).reshape(-1).float() for p in group])
            self._cp_started.append((group, engine.issue(
                runtime, index, index == len(self._cp_groups) - 1,
                Group(flat, *self._cp_segments[index]),
                compress=engine.iter >= compression.start_iter)))

    def _cp_grad(self, p) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros_like(p)
        if p.grad.layout != torch.strided:
            if not self._cp_sparse_as_dense:
                raise ValueError("a parameter has a sparse gradient (e.g. nn.Embedding(sparse="
                                 "True)); commpress reduces dense gradients: pass "
                                 "sparse_as_dense=True")
            return p.grad.to_dense()
        return p.grad.detach()

    def synchronize(self):
        """Finish reducing every gradient over ranks (the ones whose reduction has not
        started yet are started now, in order; missing gradients count as zeros) and write
        the results into ``.grad``. A group whose reduction failed fails the call, after every
        group has finished (each rank's later groups still ran their collectives) and the
        step's bookkeeping is reset, so the next backward starts a fresh step."""
        self._cp_start_ready(every=True)
        started, self._cp_started = self._cp_started, []
        failure = None
        for group, future in started:
            try:
                result = future.wait()
            except Exception as exc:  # noqa: BLE001 - re-raised below, once all have ended
                failure = failure or exc
                continue
            if self._cp_op == hvd.Sum:
                result = result.mul_(self.compression.runtime.transport.world_size)
            for p, part in zip(group, result.split([p.numel() for p in group])):
                if p.grad is None or p.grad.layout != torch.strided:
                    p.grad = saturating_cast(part, p.dtype).view_as(p)
                else:
                    p.grad.copy_(saturating_cast(part, p.grad.dtype).view_as(p.grad))
        self._cp_reset()
        if failure is not None:
            raise failure
        self._cp_synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """``step()`` inside this block does not synchronize: for Horovod's recipe of
        ``synchronize()``, then gradient clipping, then ``step()``."""
        self._cp_skip = True
        try:
            yield
        finally:
            self._cp_skip = False

    def step(self, closure=None):
        if not self._cp_synchronized and not self._cp_skip:
            self.synchronize()
        self._cp_synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._cp_started:
            raise RuntimeError("zero_grad() was called after backward() started reducing "
                               "gradients and before step() or synchronize(); the other ranks "
                               "would wait for this rank's reductions (Horovod refuses this too)")
        self._cp_reset()
        return super(self.__class__, self).zero_grad(set_to_none)


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Optional[Iterable[Tuple[str, torch.nn.Parameter]]] = None,
                         compression=None, backward_passes_per_step: int = 1, op=None,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: Optional[Sequence] = None, sparse_as_dense: bool = False,
                         process_set=None, *, codec: Optional[Codec] = None,
                         error_feedback: Optional[str] = None, server_feedback: bool = False,
                         collective: str = "auto", seed: int = 0, bucket_cap_mb: float = 25,
                         policy: str = CALIBRATED, start_iter: int = 0, min_numel: int = 1024,
                         recalibrate_every: int = 1000, plan=None) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that its gradients are averaged over Horovod ranks through
    ``codec``, a drop-in for ``hvd.DistributedOptimizer``: its arguments keep Horovod's
    meaning and order, and the reduction overlaps backward the same way (see
    :class:`_DistributedOptimizer`); ``synchronize()`` and ``skip_synchronize()`` serve the
    gradient-clipping recipe. ``opt.compression`` (:class:`HorovodCompression`) holds the
    statistics (``opt.comm_stats``), the plan and this rank's checkpoint.

    By default (``policy="calibrated"``) each group is reduced however measures fastest on
    this cluster: Horovod's fp32 or fp16 all-reduce, or ``codec`` (see
    :class:`~commpress.CompressionState`'s ``policy``; timed in step 1, then over trial
    steps); ``policy="fixed"`` runs ``codec`` on every group from step ``start_iter`` on.

    Args (Horovod's):
        compression: ``hvd.Compression.none`` (fp32) or ``hvd.Compression.fp16``
            (:class:`~commpress.FP16`); other Horovod compressors are refused: use ``codec``.
        op: ``hvd.Average`` (default) or ``hvd.Sum``.
        gradient_predivide_factor: accepted with ``op=hvd.Average`` as in Horovod; commpress
            forms the mean in fp32 after decoding, so where the division happens changes
            nothing here.
        num_groups, groups: reduce the gradients in that many groups of consecutive
            parameters, or in the given lists of parameters (others follow in buckets);
            default: buckets of ``bucket_cap_mb`` MB, like DDP's.
        sparse_as_dense: reduce sparse gradients as dense ones (sparse ones are refused
            otherwise).
        process_set: only the global process set (commpress reduces over all ranks).
    Args (commpress's, keyword only): ``codec`` (a :class:`~commpress.Codec`, or a hook name
        such as ``"qsgd4+ef"``), ``error_feedback``, ``server_feedback``, ``collective``,
        ``seed``, ``policy``, ``start_iter``, ``min_numel``, ``recalibrate_every``, ``plan``
        (see :class:`~commpress.CompressionState`), ``bucket_cap_mb``.

    Example::

        >>> opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                            model.named_parameters(), codec=QSGD(bits=4))
    """
    settings = dict(collective=collective, error_feedback=error_feedback,
                    server_feedback=server_feedback, seed=seed, policy=policy,
                    start_iter=start_iter, min_numel=min_numel,
                    recalibrate_every=recalibrate_every, plan=plan)
    codec, settings["error_feedback"] = codec_of(codec, error_feedback)
    codec = _codec_for(codec, compression)
    op = hvd.Average if op is None else op
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("op must be hvd.Average or hvd.Sum (commpress does not run Adasum)")
    if gradient_predivide_factor <= 0:
        raise ValueError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor}")
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor needs op=hvd.Average (as in Horovod)")
    if process_set is not None and process_set is not hvd.global_process_set:
        raise ValueError("commpress.horovod reduces over all ranks: process_set must be "
                         "hvd.global_process_set")
    if bucket_cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_DistributedOptimizer.__dict__))
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if any(p.is_complex() for p in params):
        raise TypeError("commpress.horovod.DistributedOptimizer reduces real gradients; "
                        f"parameters of shapes {[list(p.shape) for p in params if p.is_complex()]} "
                        "are complex (their imaginary parts would be lost): use commpress's "
                        "DDP hook, which reduces them as their real values")
    state = HorovodCompression(codec, **settings)
    wrapped._commpress_init(named_parameters, state, op,
                            _groups(params, groups, num_groups, bucket_cap_mb), sparse_as_dense,
                            backward_passes_per_step)
    return wrapped
