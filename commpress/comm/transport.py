"""The few byte-moving operations the compressed collectives need.

A transport hides the communication engine (torch.distributed here; MPI and Horovod have
their own) behind four blocking operations, and counts the bytes each rank puts on the network
under the usual ring/pairwise algorithms, from the sizes of the tensors actually handed to
the engine. Overlap with computation comes from running whole reductions on a background
thread (:mod:`commpress.comm.ordered`), not from chaining callbacks.
"""
from __future__ import annotations

import gc
import os
import socket
import sys
import time
import zlib
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
# Imported now, while no process group exists: its functions take ``group=group.WORLD`` as a
# default argument, so a first import after init_process_group (torch._dynamo's import does it:
# DDP's constructor, torch.compile) would keep the default group alive for good, and
# release_default_group could not join gloo's threads before the interpreter finalizes.
import torch.distributed.nn.functional  # noqa: F401


class Transport:
    """Interface: ``rank``, ``world_size`` and four blocking operations (and ``*_start``
    forms of three of them, which engines with asynchronous collectives override).

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
    #: bytes sent over node-local links (only node-aware transports know; see HierarchicalTransport)
    intra_node_bytes: int = 0
    local_size: int = 1

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_gather_start(self, x: torch.Tensor) -> "Pending":
        """Start ``all_gather(x)``; ``.wait()`` on the result returns its output. Engines
        with asynchronous collectives override it so codec work overlaps the wire; this
        default completes at once."""
        return Pending(self.all_gather(x))

    def all_to_all(self, x: torch.Tensor, in_splits: List[int], out_splits: List[int]) -> torch.Tensor:
        raise NotImplementedError

    def all_to_all_start(self, x: torch.Tensor, in_splits: List[int], out_splits: List[int]) -> "Pending":
        """Start ``all_to_all``, as :meth:`all_gather_start` starts ``all_gather``."""
        return Pending(self.all_to_all(x, in_splits, out_splits))

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_reduce_sum_start(self, x: torch.Tensor) -> "Pending":
        """Start ``all_reduce_sum(x)``, as :meth:`all_gather_start` starts ``all_gather``."""
        return Pending(self.all_reduce_sum(x))

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


#: seconds an operation of a front end without a group timeout of its own (MPI, Horovod) may
#: take before it raises: they wait forever on a peer that stopped answering
#: (``COMMPRESS_TIMEOUT`` overrides it; 0 waits forever)
TIMEOUT_S = 1800.0


def operation_timeout() -> Optional[float]:
    """:data:`TIMEOUT_S`, or ``COMMPRESS_TIMEOUT`` seconds; None for no limit."""
    seconds = float(os.environ.get("COMMPRESS_TIMEOUT", TIMEOUT_S))
    return seconds if seconds > 0 else None


def wait_until(done: Callable[[], bool], timeout: Optional[float], what: str) -> None:
    """Poll ``done()`` until it is true: spinning for the first millisecond (short
    collectives), then with growing sleeps of up to 1 ms. Past ``timeout`` seconds raise
    :class:`TimeoutError` naming ``what``: a peer stopped answering (hung, stopped or dead),
    and the library cannot cancel the operation, so the job must end."""
    start = time.monotonic()
    pause = 0.0
    while not done():
        now = time.monotonic()
        if timeout is not None and now - start > timeout:
            raise TimeoutError(f"commpress: {what} did not complete in {timeout:g} s: a peer "
                               f"stopped answering (hung, stopped or dead). It cannot be "
                               f"cancelled: end the job (COMMPRESS_TIMEOUT sets the limit)")
        if now - start > 1e-3:
            time.sleep(pause)
            pause = min(max(2 * pause, 1e-5), 1e-3)


class Pending:
    """A started collective: ``wait()`` returns its output (``work``: the engine's handle)."""

    def __init__(self, output: torch.Tensor, work=None):
        self.output, self.work = output, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.output

    def future(self, executor=None) -> torch.futures.Future:
        """A ``torch.futures.Future`` of the output, whose ``value()`` raises the operation's
        failure: torch.distributed's own future, else :meth:`wait` run on ``executor``'s
        thread (an :class:`~commpress.comm.ordered.OrderedExecutor`; None: waited for now)."""
        if self.work is not None and hasattr(self.work, "get_future"):
            return self.work.get_future().then(lambda done: (done.value(), self.output)[1])
        if self.work is not None and executor is not None:
            return executor.submit(self.wait)
        done = torch.futures.Future()
        done.set_result(self.wait())
        return done


# torch >= 2.10 renamed all_gather_into_tensor (which now warns) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def group_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where the group wants tensors: the current CUDA device for NCCL, CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_timeout(group: Optional[dist.ProcessGroup]):
    """The group's timeout, so groups made from it fail a hung peer as soon as it would (None:
    the backend default)."""
    try:
        return (group or dist.group.WORLD)._get_backend(group_device(group)).options._timeout
    except (AttributeError, RuntimeError):
        return None


def new_group(ranks: List[int], like: Optional[dist.ProcessGroup], every_rank_calls: bool,
              backend: Optional[str] = None) -> Optional[dist.ProcessGroup]:
    """A new group of the global ``ranks`` with ``like``'s timeout and backend (or ``backend``).

    ``every_rank_calls``: every rank of the world makes this call (members or not), so PyTorch
    names the group by its counter, which never repeats: such a group can be destroyed and
    another created freely (see :func:`destroyable`). Otherwise only members call
    (``use_local_synchronization``) and PyTorch names the group from its ranks and the number
    of live groups, so a group created after one was destroyed can get a dead group's name and
    read its stale addresses from the store ("Connection refused"): keep those."""
    return dist.new_group(ranks, backend=backend or dist.get_backend(like),
                          timeout=group_timeout(like),
                          use_local_synchronization=not every_rank_calls)


def destroyable(group: Optional[dist.ProcessGroup]) -> bool:
    """Whether destroying ``group`` is safe (it was named by PyTorch's counter, see
    :func:`new_group`)."""
    name = dist.distributed_c10d._world.pg_names.get(group, "")
    return isinstance(group, dist.ProcessGroup) and name.isdigit()


def release_default_group(timeout: float = 0.25) -> None:
    """``dist.destroy_process_group()`` that also frees the default group, on this thread,
    before the interpreter finalizes: its destructor then joins gloo's threads. Call it where
    a script would destroy the group, after dropping the DDP model (``del model``).

    Destroying only unregisters the group; while anything references it, gloo's threads live
    on. A thread still finishing the last step's future callbacks (PyTorch's PowerSGD hook,
    an fp16 all-reduce) when the interpreter finalizes is killed taking the GIL and the
    process aborts ("terminate called without an active exception", SIGABRT: 10 of 30
    two-rank PowerSGD runs here); one that drops the group's last reference itself joins
    itself ("Resource deadlock avoided"). So: collect the DDP models (they live in reference
    cycles), destroy, and give those threads up to ``timeout`` seconds to drop their
    references, so that the last one goes here. Where the caller still holds the model the
    group outlives this call, and the wait only gives in-flight callbacks time to finish."""
    world = dist.group.WORLD
    gc.collect()
    dist.destroy_process_group()
    deadline = time.monotonic() + timeout
    # 2: ``world`` and getrefcount's own argument
    while sys.getrefcount(world) > 2 and time.monotonic() < deadline:
        time.sleep(0.001)


class TorchTransport(Transport):
    """torch.distributed (gloo, NCCL) over ``group`` (None: the default group); ``device`` is
    where its own small tensors live (give the model's: for NCCL the default is the *calling
    thread's* current CUDA device), ``timeout`` the group's."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None,
                 device: Optional[torch.device] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group() first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sent_bytes = 0
        self.device = device if device is not None else group_device(group)
        self.timeout = group_timeout(group)

    def all_gather(self, x):
        return self.all_gather_start(x).wait()

    def all_gather_start(self, x):
        self._count_all_gather(x)
        out = torch.empty(self.world_size * x.numel(), dtype=x.dtype, device=x.device)
        return Pending(out, _all_gather_single(out, x, group=self.group, async_op=True))

    def all_to_all(self, x, in_splits, out_splits):
        return self.all_to_all_start(x, in_splits, out_splits).wait()

    def all_to_all_start(self, x, in_splits, out_splits):
        self._count_all_to_all(x, in_splits)
        out = torch.empty(sum(out_splits), dtype=x.dtype, device=x.device)
        return Pending(out, dist.all_to_all_single(
            out, x, output_split_sizes=list(out_splits), input_split_sizes=list(in_splits),
            group=self.group, async_op=True))

    def all_reduce_sum(self, x):
        return self.all_reduce_sum_start(x).wait()

    def all_reduce_sum_start(self, x):
        self._count_all_reduce(x)
        return Pending(x, dist.all_reduce(x, group=self.group, async_op=True))

    def broadcast(self, x, src):
        self._count_broadcast(x, src)
        dist.broadcast(x, src=dist.get_global_rank(self.group, src) if self.group else src,
                       group=self.group)
        return x


class HierarchicalTransport(Transport):
    """A flat transport plus the two sub-transports of a node-aware collective: ``intra``
    over this node's ranks (fast links) and ``inter`` over the ranks with the same local index
    on the other nodes (the slow network). The four flat operations go to ``flat``, so every
    algorithm still runs on it; ``sent_bytes`` counts all three, ``intra_node_bytes`` the node's
    share of them."""

    def __init__(self, flat: Transport, intra: Transport, inter: Transport,
                 layout: Optional[List[List[int]]] = None):
        if intra.world_size * inter.world_size != flat.world_size:
            raise ValueError(f"{intra.world_size} ranks per node x {inter.world_size} nodes != "
                             f"world size {flat.world_size}")
        self.flat, self.intra, self.inter = flat, intra, inter
        self.rank, self.world_size = flat.rank, flat.world_size
        self.local_size, self.nodes = intra.world_size, inter.world_size
        #: the flat ranks by node (``layout[node][local index]``); default: nodes of
        #: consecutive ranks
        self.layout = layout or [list(range(n * self.local_size, (n + 1) * self.local_size))
                                 for n in range(self.nodes)]
        #: per device, the chunk order of :func:`~commpress.comm.collectives.node_mean_of_chunks`
        self.owner_index: Dict[torch.device, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        """Where the flat transport wants its own small tensors."""
        return getattr(self.flat, "device", torch.device("cpu"))

    @property
    def sent_bytes(self) -> int:
        return self.flat.sent_bytes + self.intra.sent_bytes + self.inter.sent_bytes

    @property
    def intra_node_bytes(self) -> int:
        return self.intra.sent_bytes

    def all_gather(self, x):
        return self.flat.all_gather(x)

    def all_gather_start(self, x):
        return self.flat.all_gather_start(x)

    def all_to_all(self, x, in_splits, out_splits):
        return self.flat.all_to_all(x, in_splits, out_splits)

    def all_to_all_start(self, x, in_splits, out_splits):
        return self.flat.all_to_all_start(x, in_splits, out_splits)

    def all_reduce_sum(self, x):
        return self.flat.all_reduce_sum(x)

    def all_reduce_sum_start(self, x):
        return self.flat.all_reduce_sum_start(x)

    def broadcast(self, x, src):
        return self.flat.broadcast(x, src)


def node_id() -> int:
    """This process's node: torchrun's ``GROUP_RANK`` (the node rank), else Slurm's
    ``SLURM_NODEID``, else a hash of the host name."""
    for var in ("GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return zlib.crc32(socket.gethostname().encode())


def node_layout(transport: TorchTransport) -> List[List[int]]:
    """The group's ranks by node (nodes ordered by their lowest rank, ranks ascending): one
    small all-gather of every rank's :func:`node_id`."""
    mine = torch.tensor([node_id()], dtype=torch.int64, device=transport.device)
    ids = transport.all_gather(mine).tolist()
    nodes: dict = {}
    for rank, node in enumerate(ids):
        nodes.setdefault(node, []).append(rank)
    return sorted(nodes.values())


def torch_hierarchical_transport(flat: TorchTransport, layout: List[List[int]]) -> HierarchicalTransport:
    """Sub-groups of ``flat``'s group for ``layout`` (from :func:`node_layout`): this rank's node
    and this rank's local index across nodes. Only members create each group (every rank runs
    the same two calls, in the same order), so it works on a sub-group of the world too."""
    sizes = [len(ranks) for ranks in layout]
    if len(set(sizes)) != 1:
        raise ValueError(f"collective 'hierarchical' needs the same number of ranks on every node; "
                         f"got {len(layout)} nodes with {sizes} ranks (group ranks by node: {layout})")
    global_ranks = dist.get_process_group_ranks(flat.group or dist.group.WORLD)
    node = next(ranks for ranks in layout if flat.rank in ranks)
    local = node.index(flat.rank)
    if len(global_ranks) < dist.get_world_size():  # members only, this rank's two groups
        wanted = [node, [ranks[local] for ranks in layout]]
    else:  # the whole world: every rank creates every group, in the same order
        wanted = layout + [[ranks[i] for ranks in layout] for i in range(sizes[0])]
    mine = []
    for members in wanted:
        group = new_group([global_ranks[r] for r in members], flat.group,
                          every_rank_calls=len(global_ranks) == dist.get_world_size())
        if flat.rank in members:
            mine.append(group)
    return HierarchicalTransport(flat, TorchTransport(mine[0], flat.device),
                                 TorchTransport(mine[1], flat.device), layout)
