"""Horovod front end: the same codecs and collective algorithms over Horovod's operations.

Build Horovod with ``launch/install_horovod.sh`` and run with ``horovodrun``::

    import horovod.torch as hvd, commpress as cp, commpress.horovod as cphvd
    hvd.init()
    opt = cphvd.DistributedOptimizer(opt, model.named_parameters(), codec=cp.QSGD(bits=4))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    horovodrun -np 4 -H host1:2,host2:2 --gloo python train.py
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

from .codecs import Codec
from .comm.agreement import agree
from .comm.pipeline import reduce_gradient
from .comm.transport import Transport
from .config import CompressionConfig
from .feedback import ErrorFeedback
from .stats import CommStats

try:
    import horovod.torch as hvd
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError("commpress.horovod needs Horovod with PyTorch support: "
                      "bash launch/install_horovod.sh") from exc


class HorovodTransport(Transport):
    """The transport operations on Horovod (after ``hvd.init()``). Horovod matches operations
    across ranks by name; unnamed synchronous calls get the same generated names on every
    rank as long as every rank issues them in the same order, which the front end ensures.
    bfloat16 sums (unsupported by Horovod) travel as float32."""

    def __init__(self):
        self.rank, self.world_size = hvd.rank(), hvd.size()
        self.sent_bytes = 0

    def all_gather(self, x):
        self._count_all_gather(x)
        return hvd.allgather(x)

    def all_to_all(self, x, in_splits, out_splits):
        self._count_all_to_all(x, in_splits)
        out = hvd.alltoall(x, splits=torch.tensor(in_splits, dtype=torch.int32))
        return out[0] if isinstance(out, tuple) else out  # newer Horovod also returns the splits

    def all_reduce_sum(self, x):
        if x.dtype == torch.bfloat16:
            return x.copy_(self.all_reduce_sum(x.float()))
        self._count_all_reduce(x)
        return x.copy_(hvd.allreduce(x, op=hvd.Sum))

    def broadcast(self, x, src):
        self._count_broadcast(x, src)
        return x.copy_(hvd.broadcast(x, root_rank=src))


_TRANSPORT: Optional[HorovodTransport] = None


def _transport() -> HorovodTransport:
    global _TRANSPORT
    if _TRANSPORT is None or _TRANSPORT.world_size != hvd.size():
        _TRANSPORT = HorovodTransport()
    return _TRANSPORT


def allreduce(tensor: torch.Tensor, codec: Codec, collective: str = "auto",
              generator: Optional[torch.Generator] = None,
              stats: Optional[CommStats] = None) -> torch.Tensor:
    """The mean over Horovod ranks of ``tensor`` through ``codec`` (same shape and dtype)."""
    transport = _transport()
    agree(transport, {"call": "allreduce", **CompressionConfig(codec, collective).shared(),
                      "shape": list(tensor.shape), "dtype": str(tensor.dtype)})
    mean = reduce_gradient(tensor.detach().reshape(-1), [None], codec, transport, collective,
                           None, generator, stats)
    return mean.to(tensor.dtype).view(tensor.shape)


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the wrapped optimizer's class, as ``hvd.DistributedOptimizer`` does."""

    def _commpress_init(self, named_parameters, codec, error_feedback, collective,
                        backward_passes_per_step, seed):
        self._cp_config = CompressionConfig(codec, collective, error_feedback, seed=seed)
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be >= 1")
        named = list(named_parameters) if named_parameters is not None else []
        names = {p: n for n, p in named}
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        unnamed = [p for p in params if p not in names]
        if named and unnamed:
            raise ValueError(f"named_parameters misses {len(unnamed)} of the optimizer's parameters")
        self._cp_params = params
        self._cp_codec, self._cp_collective = codec, collective
        self._cp_feedback = ErrorFeedback(error_feedback) if error_feedback else None
        if self._cp_feedback is not None:
            self._cp_feedback.bind([(names.get(p, f"param.{i}"), p) for i, p in enumerate(params)])
        self._cp_passes = backward_passes_per_step
        self._cp_counts = {p: 0 for p in params}
        self._cp_generator = torch.Generator().manual_seed(seed * 1_000_003 + hvd.rank())
        self._cp_synchronized = False
        self.comm_stats = CommStats()
        for p in params:  # count backward passes, as Horovod's hooks do
            p.register_post_accumulate_grad_hook(self._cp_count)

    def _cp_count(self, param):
        self._cp_counts[param] += 1
        if self._cp_counts[param] > self._cp_passes:
            raise RuntimeError(f"gradients were computed more than backward_passes_per_step="
                               f"{self._cp_passes} times before step(); call step() or "
                               "zero_grad() in between, or raise backward_passes_per_step")

    def synchronize(self):
        """Average every gradient over ranks through the codec (one flat vector, in parameter
        order on every rank). Parameters without a gradient on any rank count as zeros."""
        params = self._cp_params
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        transport = _transport()
        agree(transport, {"call": "synchronize", **self._cp_config.shared(),
                          "shapes": [list(p.shape) for p in params]})
        flat = torch.cat([p.grad.detach().reshape(-1).float() for p in params])
        mean = reduce_gradient(flat, params, self._cp_codec, transport, self._cp_collective,
                               self._cp_feedback, self._cp_generator, self.comm_stats)
        for p, part in zip(params, mean.split([p.numel() for p in params])):
            p.grad.copy_(part.view_as(p.grad))
        self._cp_counts = {p: 0 for p in params}
        self._cp_synchronized = True
        self.comm_stats.end_step()

    def step(self, closure=None):
        if not self._cp_synchronized:
            self.synchronize()
        self._cp_synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self._cp_counts = {p: 0 for p in self._cp_params}
        return super(self.__class__, self).zero_grad(set_to_none)


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Optional[Iterable[Tuple[str, torch.nn.Parameter]]] = None,
                         codec: Optional[Codec] = None, error_feedback: Optional[str] = None,
                         collective: str = "auto", backward_passes_per_step: int = 1,
                         seed: int = 0) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` first averages the gradients over Horovod ranks
    through ``codec`` (like ``hvd.DistributedOptimizer``; ``synchronize()`` may be called
    explicitly, e.g. before gradient clipping). ``comm_stats`` counts the bytes.

    Example::

        >>> opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                            model.named_parameters(), codec=QSGD(bits=4))
    """
    if codec is None:
        raise ValueError("DistributedOptimizer needs a codec, e.g. commpress.QSGD(bits=4)")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_DistributedOptimizer.__dict__))
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    wrapped._commpress_init(named_parameters, codec, error_feedback, collective,
                            backward_passes_per_step, seed)
    return wrapped
