"""FSDP front end: the gradient reduce-scatter of FSDP2 (``fully_shard``) through a codec.

Two lines after sharding the model::

    fully_shard(layer) for each block; fully_shard(model)
    state = commpress.fsdp.compress(model, "qsgd4")      # every FSDPModule of the model
    ...train...
    print(state.stats.summary())

Each FSDP module's reduce-scatter input (its flat gradient, W shards end to end, in FSDP's
reduce dtype) is handed to :class:`CompressedReduceScatter`: every rank encodes its W shards,
one all-to-all moves them, and each rank decodes the W payloads of its own shard in rank
order, in fp32, into FSDP's output (:func:`commpress.comm.collectives.compressed_reduce_scatter`).
One quantization per value, ``(W-1)/W`` of the compressed gradient on the wire per rank. The
reduction runs where FSDP runs its own (on its reduce-scatter stream on a GPU), in FSDP's
order, over FSDP's group.

By default the calibrated policy (:mod:`commpress.engine.policy`) decides per module: FSDP's
own reduce-scatter, the same in bf16, or the codec, whichever measures fastest (the most exact
within 5%), first timed alone in the second backward, then over real steps.

Across nodes of several ranks, ``two_hop=True`` reduces in two hops, as ZeRO++'s qgZ does:
uncompressed inside the node (in FSDP's reduce dtype), then the codec between nodes, so that a
rank sends ``N - 1`` compressed chunks over the network (N nodes) instead of ``W - 1``.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Union

import torch
import torch.distributed as dist

from .codecs import Codec, saturating_cast
from .comm.calibration import CALIBRATED, FP32, SAMPLE_NUMEL, Candidate
from .comm.collectives import (Channel, FeedbackBuffers, choose_algorithm, compressed_mean,
                               compressed_reduce_scatter,
                               node_mean_of_chunks)
from .comm.transport import (HierarchicalTransport, TorchTransport, node_layout,
                             torch_hierarchical_transport)
from .engine.reduction import Ticket
from .engine.state import EngineState
from .feedback import ErrorFeedback
from .names import state_of
from .stats import CommStats

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
except ImportError:  # pragma: no cover - depends on the torch version
    FSDPModule, ReduceScatter = None, object

logger = logging.getLogger("commpress.fsdp")

#: gradient dtypes the codecs take (FSDP's reduce dtype)
_REDUCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: what the calibrated policy chooses between, most exact first: FSDP's own reduce-scatter
#: (uncompressed, in its reduce dtype), the same in bf16, and the codec
OWN = Candidate("fsdp", "reduce_scatter")
IN_BF16 = Candidate("bf16", "reduce_scatter")
CODEC = Candidate("codec", "reduce_scatter")
#: the same for hybrid sharding's cross-node all-reduce of each shard
REPLICA_BF16 = Candidate("bf16", "allreduce")
REPLICA_CODEC = Candidate("codec", "allreduce")


class FSDPCompressionState(EngineState):
    """Configuration, statistics and error-feedback memories of one model's compressed
    reduce-scatters (see :func:`compress`); :attr:`plan`, :meth:`save_plan`,
    :meth:`state_dict` / :meth:`load_state_dict` (this rank's) as every front end's state.

    Args:
        codec: the :class:`~commpress.Codec` each shard is encoded with.
        error_feedback: None, ``"ef"`` or ``"ef21"``. ``"ef"``: each rank keeps, per FSDP
            module, what compression lost of its whole (unsharded) flat gradient and adds it to
            the next one: one fp32 copy of the module's unsharded gradient per rank, W times
            the module's shard (the memory FSDP's sharding saves on gradients). ``"ef21"``:
            each rank keeps its estimate of its whole gradient (the same W shards) and, of the
            shared estimate, only its own shard (one more): the shard FSDP hands the
            optimizer is that estimate's. A sharded alternative (each rank keeping the
            residual of its own shard only, 1x) would drop what the other ranks' shards lost
            in this rank's encoding, which is what error feedback exists to send again.
        seed: stochastic rounding on rank ``r`` uses a generator seeded from ``(seed, r)``.
        policy: ``"calibrated"`` (default): per module, FSDP's own reduce-scatter, the same in
            bf16, or the codec, as measured (see the module docstring); the plan is in
            :attr:`stats`' summary and the state dict. ``"fixed"``: the codec on every
            reduce-scatter from the first step.
        recalibrate_every, plan: as the DDP hook's (:class:`commpress.CompressionState`).
        two_hop: the codec's reduce-scatter in two hops on several nodes of several ranks
            (nodes as :func:`commpress.comm.transport.node_id` tells them, e.g. torchrun's
            ``GROUP_RANK``): FSDP's chunks averaged inside the node uncompressed, then
            compressed between nodes. Error feedback then keeps what compression lost of
            the node's mean of this rank's N chunks: ``1/L`` of the module's unsharded
            gradient per rank (L ranks per node) instead of all of it. On one node, or one
            rank per node, the codec runs in one hop (logged).
    """

    def __init__(self, codec: Codec, error_feedback: Optional[str] = None, seed: int = 0,
                 policy: str = CALIBRATED, recalibrate_every: int = 1000, plan=None,
                 two_hop: bool = False):
        #: set by :func:`compress` with ``replicate_group``: the policy then decides the
        #: cross-node all-reduces
        self.hybrid = False
        super().__init__(codec, "reduce_scatter", error_feedback, False, seed, policy,
                         start_iter=0, min_numel=0, recalibrate_every=recalibrate_every,
                         plan=plan, unit="module", options=self._candidates)
        if not isinstance(two_hop, bool):
            raise TypeError(f"two_hop must be True or False, got {two_hop!r}")
        self.two_hop = two_hop
        self._step_open = False
        self._transports: Dict[dist.ProcessGroup, TorchTransport] = {}
        self._node_transports: Dict[dist.ProcessGroup, Optional[HierarchicalTransport]] = {}

    def _candidates(self, world_size: int, hierarchical: bool) -> List[Candidate]:
        """What the calibrated policy chooses between, most exact first."""
        return [FP32, REPLICA_BF16, REPLICA_CODEC] if self.hybrid else [OWN, IN_BF16, CODEC]

    def _config(self) -> Dict:
        # error-feedback memories differ in size between one hop and two
        return {**super()._config(), "two_hop": self.two_hop, "hybrid": self.hybrid}

    def transport(self, group: dist.ProcessGroup, device: torch.device) -> TorchTransport:
        if group not in self._transports:
            self._transports[group] = TorchTransport(group, device if device.type == "cuda" else None)
        return self._transports[group]

    def node_transport(self, group: dist.ProcessGroup,
                       device: torch.device) -> Optional[HierarchicalTransport]:
        """``group``'s ranks by node for ``two_hop`` (made at its first reduce-scatter, by
        every rank of the group alike); None where there is no second hop to make."""
        if group not in self._node_transports:
            flat = self.transport(group, device)
            layout = node_layout(flat)
            if len(layout) > 1 and len(layout[0]) > 1:
                self._node_transports[group] = torch_hierarchical_transport(flat, layout)
            else:
                logger.warning("commpress.fsdp: two_hop on %d node(s) of %s rank(s): the codec "
                               "runs in one hop", len(layout), "/".join(str(len(r)) for r in layout))
                self._node_transports[group] = None
        return self._node_transports[group]

    def generator(self, device: torch.device, rank: int) -> Optional[torch.Generator]:
        return self.engine.generator(device, rank)

    def _begin(self, transport: TorchTransport, device: torch.device) -> bool:
        """At every reduce-scatter: at a backward's first, let the policy begin the step and
        have the step closed when that backward ends. Returns whether the call must close
        the step itself (outside a backward: a direct call is a step of its own)."""
        if self._step_open:
            return False
        before = self._policy.plan
        self._policy.begin_step(self.iter, True, transport, device, inline=False)
        self.engine.report_if_adopted(before, transport.rank)
        self._step_open = True
        try:
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: self._end_step(transport))
            return False
        except RuntimeError:
            return True

    def reduce(self, transport: TorchTransport, device: torch.device, numel: int, fp32_bytes: int,
               uncompressed: Candidate, calibrate, run) -> None:
        """One module's reduction under the policy, for both hooks: begin the step at its
        first, count ``fp32_bytes``, then calibrate (``calibrate()``; the reduction itself
        goes ``uncompressed``) or choose, ``run(choice)`` (timed for drift once a plan is
        adopted), and close a step that no backward will close."""
        closes_step = self._begin(transport, device)
        self.stats.add(fp32_bytes=fp32_bytes)
        # never the step's last group: the step is closed at its end (drift included)
        ticket = Ticket(self.iter, 0, False, True, self._policy.calibrating,
                        self._policy.step_plan, self.phase, None)
        self._policy.run_group(ticket, numel, calibrate, run, uncompressed)
        if closes_step:
            self._end_step(transport)

    def _end_step(self, transport: TorchTransport) -> None:
        policy = self._policy
        if policy.calibrating:
            self.engine.calibration_done(transport.world_size, False, transport.rank)
        elif policy.step_plan is not None and policy.step_plan is policy.plan:
            policy.drift.add(0.0, step_done=True)
        self._step_open = False
        self.engine.iter += 1
        self.engine.end_step(self.phase, transport.rank)


class CompressedReduceScatter(ReduceScatter):
    """FSDP2's ``ReduceScatter`` interface through commpress, for
    ``module.set_custom_reduce_scatter(...)`` (one per module: ``name`` keys the module's
    error-feedback memory). Honours ``op`` (FSDP's ``AVG``; ``SUM`` with its own pre- and
    post-division; ``PREMUL_SUM`` from ``set_gradient_divide_factor``), FSDP's reduce dtype
    (fp32, bf16, fp16: decoded in fp32, written back saturating) and ``async_op``."""

    def __init__(self, state: FSDPCompressionState, name: str):
        self.state, self.name = state, name

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op, async_op: bool = False):
        state = self.state
        _scale_of(op, group.size())  # refuses an op it cannot honour before anything is sent
        if input_tensor.dtype not in _REDUCE_DTYPES:
            raise TypeError(f"commpress.fsdp: reduce dtype {input_tensor.dtype} is not one the "
                            f"codecs take (float32, bfloat16, float16): set "
                            f"MixedPrecisionPolicy(reduce_dtype=...) to one of them")
        device = input_tensor.device
        transport = state.transport(group, device)
        w, flat, out = transport.world_size, input_tensor.reshape(-1), output_tensor.reshape(-1)
        state.reduce(transport, device, flat.numel(), (w - 1) * 4 * flat.numel() // w, OWN,
                     lambda: self._calibrate(flat, out, op, transport),
                     lambda choice: self._reduce(choice, flat, out, op, transport,
                                                 state.feedback, state.stats))
        return _Completed() if async_op else None

    def _reduce(self, choice: Candidate, flat, out, op, transport: TorchTransport,
                feedback: Optional[ErrorFeedback], stats: Optional[CommStats]) -> None:
        """``out`` = this rank's shard of the reduction (``op``) of ``flat`` over the
        transport's group, as ``choice`` says."""
        group, scale = transport.group, _scale_of(op, transport.world_size)
        if choice in (OWN, FP32, IN_BF16):
            wire = torch.bfloat16 if choice == IN_BF16 else flat.dtype
            started = time.perf_counter()
            _own_reduce_scatter(flat.to(wire), out, group, op)
            if stats is not None:
                w = transport.world_size
                stats.add(wire_bytes=(w - 1) * flat.numel() * wire.itemsize // w,
                          comm_seconds=time.perf_counter() - started)
            return
        rank = transport.rank  # seeds this rank's rounding, whichever hop runs the codec
        nodes = self.state.node_transport(group, flat.device) if self.state.two_hop else None
        if nodes is not None:  # inside the node first, uncompressed; the codec across nodes
            before, started = nodes.intra.sent_bytes, time.perf_counter()
            flat, transport = node_mean_of_chunks(flat, nodes), nodes.inter
            if stats is not None:
                moved = nodes.intra.sent_bytes - before
                stats.add(wire_bytes=moved, intra_node_bytes=moved,
                          comm_seconds=time.perf_counter() - started)
        codec, numel = self.state.codec, flat.numel()
        sent = feedback.compensate([self.name], flat, [numel], codec) if feedback else flat
        # EF's residual goes over what was sent; EF21 needs its own C(sent) = sent - residual
        local = torch.empty_like(sent) if feedback and feedback.keeps_local else None
        residual = sent if feedback and feedback.residual_in_place else local
        channel = Channel(codec, transport, self.state.generator(flat.device, rank), stats)
        mean = compressed_reduce_scatter(sent, channel, residual_out=residual)
        if feedback:
            if local is not None:
                torch.sub(sent, local, out=local)
            mean = feedback.update([self.name], sent, local, mean, [numel], [mean.numel()])
        if scale != 1.0:
            mean.mul_(scale)
        out.copy_(saturating_cast(mean, out.dtype))

    def _calibrate(self, flat, out, op, transport: TorchTransport) -> None:
        """Time every candidate on this module's reduce-scatter (on a sample of each shard
        past :data:`~commpress.comm.calibration.SAMPLE_NUMEL` values in all), with error
        feedback on a scratch memory so that its cost counts."""
        w = transport.world_size
        n = flat.numel() // w
        k = max(1, min(n, SAMPLE_NUMEL // w))
        sample = flat.view(w, n)[:, :k].reshape(-1)
        scratch, shard = torch.empty_like(sample), torch.empty(k, dtype=out.dtype, device=out.device)
        feedback = ErrorFeedback(self.state.error_feedback) if self.state.feedback else None

        def run(choice):
            return lambda: self._reduce(choice, scratch, shard, op, transport, feedback, None)
        self.state._policy.calibrate(flat.numel(), self.state._candidates(w, False), run,
                                     transport, flat.device,
                                     prepare=lambda: scratch.copy_(sample), scale=n / k)


def _own_reduce_scatter(flat: torch.Tensor, out: torch.Tensor, group, op) -> None:
    """FSDP's own reduce-scatter of ``flat`` into ``out`` (cast back to its dtype), with
    ``PREMUL_SUM(f)`` as a sum times ``f`` (gloo has no PREMUL_SUM)."""
    factor = None
    if getattr(op, "op", op) == dist.ReduceOp.PREMUL_SUM:
        op, factor = dist.ReduceOp.SUM, float(op.factor)
    shard = out if out.dtype == flat.dtype else torch.empty(out.shape, dtype=flat.dtype,
                                                          device=out.device)
    dist.reduce_scatter_tensor(shard, flat, op=op, group=group)
    if factor is not None:
        shard.mul_(factor)
    if shard is not out:
        out.copy_(shard)


class CompressedAllReduce:
    """FSDP's all-reduce hook (``module.set_all_reduce_hook``) averaging a module's
    reduce-scatter output over ``group`` (the ranks holding the same shard on the other nodes),
    in place: the cross-node hop of hybrid sharding. Under the calibrated policy each module's
    hop goes in fp32, bf16 or through the codec, as measured; under the fixed one, through
    the codec. ``name`` keys the module's error-feedback memory (this shard's)."""

    def __init__(self, state: FSDPCompressionState, name: str, group: dist.ProcessGroup):
        self.state, self.name, self.group = state, name, group

    def __call__(self, reduce_output: torch.Tensor) -> None:
        state = self.state
        if reduce_output.dtype not in _REDUCE_DTYPES:
            raise TypeError(f"commpress.fsdp: reduce dtype {reduce_output.dtype} is not one the "
                            f"codecs take (float32, bfloat16, float16)")
        device = reduce_output.device
        transport = state.transport(self.group, device)
        flat, w = reduce_output.reshape(-1), transport.world_size
        state.reduce(transport, device, flat.numel(), 2 * (w - 1) * 4 * flat.numel() // w, FP32,
                     lambda: self._calibrate(flat, transport),
                     lambda choice: self._reduce(choice, flat, transport, state.feedback,
                                                 state.stats))

    def _reduce(self, choice: Candidate, flat: torch.Tensor, transport: TorchTransport,
                feedback: Optional[ErrorFeedback], stats: Optional[CommStats]) -> None:
        """``flat`` = its mean over the group, as ``choice`` says."""
        state, w = self.state, transport.world_size
        if choice.codec != "codec":
            wire = torch.bfloat16 if choice == REPLICA_BF16 else flat.dtype
            started = time.perf_counter()
            sent = flat.to(wire).div_(w)  # scaled first: a sum in fp16/bf16 cannot overflow
            dist.all_reduce(sent, group=self.group)
            flat.copy_(sent)
            if stats is not None:
                stats.add(wire_bytes=2 * (w - 1) * flat.numel() * wire.itemsize // w,
                          comm_seconds=time.perf_counter() - started)
            return
        sent = (feedback.compensate([self.name], flat, [flat.numel()], state.codec) if feedback
                else flat.float())
        local = torch.empty_like(sent) if feedback and feedback.keeps_local else None
        residual = sent if feedback and feedback.residual_in_place else None
        channel = Channel(state.codec, transport, state.generator(flat.device, transport.rank),
                          stats)
        mean, local = compressed_mean(sent, channel, choose_algorithm(state.codec, flat.numel(), w),
                                      feedback=FeedbackBuffers(local=local, residual=residual))
        if feedback:
            mean = feedback.update([self.name], sent, local, mean, [flat.numel()])
        flat.copy_(saturating_cast(mean, flat.dtype))

    def _calibrate(self, flat: torch.Tensor, transport: TorchTransport) -> None:
        """Time every candidate on this module's hop (on its first
        :data:`~commpress.comm.calibration.SAMPLE_NUMEL` values), error feedback on a scratch
        memory so that its cost counts."""
        k = max(1, min(flat.numel(), SAMPLE_NUMEL))
        sample, scratch = flat[:k].clone(), torch.empty_like(flat[:k])
        feedback = ErrorFeedback(self.state.error_feedback) if self.state.feedback else None

        def run(choice):
            return lambda: self._reduce(choice, scratch, transport, feedback, None)
        self.state._policy.calibrate(flat.numel(), self.state._candidates(transport.world_size, True),
                                     run, transport, flat.device,
                                     prepare=lambda: scratch.copy_(sample), scale=flat.numel() / k)


class _Completed:
    """The work of a reduction that finished before it was returned (``async_op=True``)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        future = torch.futures.Future()
        future.set_result(None)
        return future


def _scale_of(op, world_size: int) -> float:
    """What the mean is multiplied by to give ``op``'s result."""
    kind = getattr(op, "op", op)  # PREMUL_SUM(f) is a ReduceOp holding .op and .factor
    if kind == dist.ReduceOp.AVG:
        return 1.0
    if kind == dist.ReduceOp.SUM:
        return float(world_size)
    if kind == dist.ReduceOp.PREMUL_SUM:
        return float(world_size) * float(op.factor)
    raise ValueError(f"commpress.fsdp reduces gradients with AVG, SUM or PREMUL_SUM, got {op!r}")


def compress(model: torch.nn.Module, state: Union[FSDPCompressionState, str, Codec] = "qsgd4",
             replicate_group: Optional[dist.ProcessGroup] = None,
             **kwargs) -> FSDPCompressionState:
    """Make every FSDP module of ``model`` (``fully_shard`` applied to it or its submodules)
    reduce-scatter its gradients through ``state``: a :class:`FSDPCompressionState`, a hook
    name such as ``"qsgd4"`` or ``"qsgd8+ef"``, or a :class:`~commpress.Codec` (``kwargs`` go
    to the state made from a name or codec). Call it on every rank, after ``fully_shard``.
    Returns the state.

    ``two_hop=True`` (a state setting): plain FSDP over several nodes, its codec reduce-scatter
    in two hops (inside the node uncompressed, then compressed between nodes; see
    :class:`FSDPCompressionState`).

    ``replicate_group``: hybrid sharding across nodes. Shard each module inside a node
    (``fully_shard(module, mesh=<the node's ranks>)``) and pass the group of the ranks that
    hold the same shard on the other nodes: FSDP's own reduce-scatter then runs inside the
    node, on its fast links, and commpress averages each shard across nodes, compressed,
    through FSDP's all-reduce hook (:class:`CompressedAllReduce`), under the state's policy
    (calibrated: per module fp32, bf16 or the codec, as measured).

    Example::

        >>> for block in model.blocks: fully_shard(block)
        >>> fully_shard(model)
        >>> state = commpress.fsdp.compress(model, "qsgd8+ef")
    """
    if FSDPModule is None or not hasattr(FSDPModule, "set_custom_reduce_scatter"):
        raise RuntimeError(f"commpress.fsdp needs FSDP2's FSDPModule.set_custom_reduce_scatter "
                           f"(torch >= 2.6); this torch is {torch.__version__}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError("commpress.fsdp.compress takes a model sharded with fully_shard; this is "
                        "a DistributedDataParallel model: use commpress.register_hook for DDP")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"commpress.fsdp.compress takes an nn.Module, got {type(model).__name__}")
    state = state_of(state, FSDPCompressionState, FSDPCompressionState, "compress", **kwargs)
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise TypeError("commpress.fsdp.compress found no FSDP module in the model: apply "
                        "torch.distributed.fsdp.fully_shard to it (and its blocks) first")
    if replicate_group is not None:
        if not isinstance(replicate_group, dist.ProcessGroup):
            raise TypeError(f"replicate_group must be a ProcessGroup (e.g. "
                            f"mesh['replicate'].get_group()), got {type(replicate_group).__name__}")
        if state.two_hop:
            raise ValueError("commpress.fsdp: two_hop splits a reduce-scatter over nodes; with "
                             "replicate_group= FSDP's reduce-scatter already stays inside the "
                             "node: pass one or the other")
        state.hybrid = True
    for name, module in modules:
        try:
            if replicate_group is None:
                module.set_custom_reduce_scatter(CompressedReduceScatter(state, name or "<root>"))
            else:
                module.set_all_reduce_hook(CompressedAllReduce(state, name or "<root>",
                                                               replicate_group))
        except ValueError as exc:  # several parameter groups (per-parameter meshes)
            raise ValueError(f"commpress.fsdp: module {name or '<root>'!r}: {exc} Shard it with "
                             f"one mesh (no shard_placement_fn giving several)") from None
    return state
