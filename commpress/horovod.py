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
from .comm.ordered import OrderedExecutor
from .comm.pipeline import reduce_gradient
from .comm.transport import Pending, Transport, operation_timeout, wait_until
from .config import CompressionConfig
from .feedback import ErrorFeedback
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
        if x.dtype == torch.bfloat16:
            return x.copy_(self.all_reduce_sum(x.float()))
        self._count_all_reduce(x)
        name = self._name("allreduce")
        return x.copy_(_HorovodPending(hvd.allreduce_async(x, op=hvd.Sum, name=name), name).wait())

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
    mean = reduce_gradient(tensor.detach().reshape(-1), [None], codec, transport, collective,
                           None, generator, stats, agreed=True)
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
    groups of consecutive parameters), or DDP-like buckets of ``bucket_cap_mb``. Parameters
    go in reverse order, the order in which backward produces their gradients."""
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
    cap, buckets, current, current_bytes = bucket_cap_mb * 2 ** 20, [], [], 0
    for p in order:
        if current and current_bytes + 4 * p.numel() > cap:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += 4 * p.numel()
    return buckets + ([current] if current else [])


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the wrapped optimizer's class, as ``hvd.DistributedOptimizer`` does.

    A hook on every parameter counts its backward passes; when the last pass of a step has
    produced every gradient of a group, and every group before it has been started, the
    group's gradients are copied into one vector and handed to a worker thread that reduces
    groups one after another, in group order on every rank (so Horovod's operations match),
    while backward goes on. ``synchronize()`` starts the groups whose gradients did not all
    arrive (zeros for missing gradients), waits for all, and writes the means back."""

    def _commpress_init(self, named_parameters, codec, op, groups, sparse_as_dense,
                        error_feedback, collective, backward_passes_per_step, seed):
        self._cp_config = CompressionConfig(codec, collective, error_feedback, seed=seed)
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be >= 1")
        named = list(named_parameters) if named_parameters is not None else []
        names = {p: n for n, p in named}
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        unnamed = [p for p in params if p not in names]
        if named and unnamed:
            raise ValueError(f"named_parameters misses {len(unnamed)} of the optimizer's parameters")
        self._cp_params, self._cp_groups = params, groups
        self._cp_group_of = {p: i for i, group in enumerate(groups) for p in group}
        self._cp_codec, self._cp_collective, self._cp_op = codec, collective, op
        self._cp_sparse_as_dense = sparse_as_dense
        self._cp_feedback = ErrorFeedback(error_feedback) if error_feedback else None
        if self._cp_feedback is not None:
            self._cp_feedback.bind([(names.get(p, f"param.{i}"), p) for i, p in enumerate(params)])
        self._cp_passes = backward_passes_per_step
        self._cp_generator = torch.Generator().manual_seed(self._cp_config.rank_seed(hvd.rank()))
        self._cp_transport = HorovodTransport(f"commpress.opt{next(_OPTIMIZERS)}")
        self._cp_executor = OrderedExecutor("commpress-horovod")
        self._cp_agreed = False
        self._cp_skip = False
        self._cp_reset()
        self._cp_synchronized = False
        self.comm_stats = CommStats()
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
        while len(self._cp_started) < len(self._cp_groups):
            index = len(self._cp_started)
            if not every and self._cp_missing[index]:
                return
            group = self._cp_groups[index]
            flat = torch.cat([self._cp_grad(p).reshape(-1).float() for p in group])
            self._cp_started.append((group, self._cp_executor.submit(
                lambda g=group, f=flat, first=index == 0: self._cp_reduce(g, f, first))))

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

    def _cp_reduce(self, group, flat, first):
        """On the worker thread: the mean (or sum) of one group over ranks."""
        transport = self._cp_transport
        if first and not self._cp_agreed:  # every rank's first operation of its first step
            agree(transport, {"call": "DistributedOptimizer", **self._cp_config.shared(),
                              "op": self._cp_op, "passes": self._cp_passes,
                              "groups": [[list(p.shape) for p in g] for g in self._cp_groups]})
            self._cp_agreed = True
        w = transport.world_size
        self.comm_stats.add(fp32_bytes=2 * (w - 1) * 4 * flat.numel() // w)
        mean = reduce_gradient(flat, group, self._cp_codec, transport, self._cp_collective,
                               self._cp_feedback, self._cp_generator, self.comm_stats,
                               in_place=True, agreed=True)
        return mean.mul_(w) if self._cp_op == hvd.Sum else mean

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
            for p, part in zip(group, result.split([p.numel() for p in group])):
                if p.grad is None or p.grad.layout != torch.strided:
                    p.grad = saturating_cast(part, p.dtype).view_as(p)
                else:
                    p.grad.copy_(saturating_cast(part, p.grad.dtype).view_as(p.grad))
        self._cp_reset()
        if failure is not None:
            raise failure
        self._cp_synchronized = True
        self.comm_stats.end_step()

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
                         error_feedback: Optional[str] = None, collective: str = "auto",
                         seed: int = 0, bucket_cap_mb: float = 25) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that its gradients are averaged over Horovod ranks through
    ``codec``, a drop-in for ``hvd.DistributedOptimizer``: its arguments keep Horovod's
    meaning and order, and the reduction overlaps backward the same way (see
    :class:`_DistributedOptimizer`); ``synchronize()`` and ``skip_synchronize()`` serve the
    gradient-clipping recipe. ``comm_stats`` counts the bytes.

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
    Args (commpress's, keyword only): ``codec``, ``error_feedback``, ``collective``, ``seed``
        (see :class:`~commpress.CompressionState`), ``bucket_cap_mb``.

    Example::

        >>> opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                            model.named_parameters(), codec=QSGD(bits=4))
    """
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
    wrapped._commpress_init(named_parameters, codec, op, _groups(params, groups, num_groups, bucket_cap_mb),
                            sparse_as_dense, error_feedback, collective, backward_passes_per_step,
                            seed)
    return wrapped
