"""The few byte-moving operations the compressed collectives need.

A transport hides the communication engine (torch.distributed here; MPI and Horovod have
their own) behind four blocking operations, and counts the bytes each rank puts on the network
under the usual ring/pairwise algorithms, from the sizes of the tensors actually handed to
the engine. Overlap with computation comes from running whole reductions on a background
thread (:mod:`commpress.comm.ordered`), not from chaining callbacks.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


class Transport:
    """Interface: ``rank``, ``world_size`` and four blocking operations.

    Every operation returns the output tensor and adds to ``sent_bytes`` what this rank sends
    on the wire:

    - ``all_gather(x)``: every rank's equal-sized ``x`` concatenated in rank order;
      sends ``(W-1) * x.nbytes`` (ring).
    - ``all_to_all(x, in_splits, out_splits)``: element counts per peer; sends the bytes of
      the splits addressed to the other ranks.
    - ``all_reduce_sum(x)``: in-place sum; sends ``2(W-1)/W * x.nbytes`` (ring).
    - ``broadcast(x, src)``: in-place; the source sends ``x.nbytes`` (tree/pipeline).
    """

    rank: int
    world_size: int
    sent_bytes: int = 0

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_to_all(self, x: torch.Tensor, in_splits: List[int], out_splits: List[int]) -> torch.Tensor:
        raise NotImplementedError

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        raise NotImplementedError

    # -- accounting, shared by all engines ------------------------------------------------
    def _count_all_gather(self, x):
        self.sent_bytes += (self.world_size - 1) * x.nbytes

    def _count_all_to_all(self, x, in_splits):
        itemsize = x.element_size()
        self.sent_bytes += (sum(in_splits) - in_splits[self.rank]) * itemsize

    def _count_all_reduce(self, x):
        w = self.world_size
        self.sent_bytes += 2 * (w - 1) * x.nbytes // w

    def _count_broadcast(self, x, src):
        if self.rank == src and self.world_size > 1:
            self.sent_bytes += x.nbytes


# torch >= 2.10 renamed all_gather_into_tensor (which now warns) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchTransport(Transport):
    """torch.distributed (gloo, NCCL) over ``group`` (None: the default group)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group() first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sent_bytes = 0

    def all_gather(self, x):
        self._count_all_gather(x)
        out = torch.empty(self.world_size * x.numel(), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.group)
        return out

    def all_to_all(self, x, in_splits, out_splits):
        self._count_all_to_all(x, in_splits)
        out = torch.empty(sum(out_splits), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x, output_split_sizes=list(out_splits),
                               input_split_sizes=list(in_splits), group=self.group)
        return out

    def all_reduce_sum(self, x):
        self._count_all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def broadcast(self, x, src):
        self._count_broadcast(x, src)
        dist.broadcast(x, src=dist.get_global_rank(self.group, src) if self.group else src,
                       group=self.group)
        return x
