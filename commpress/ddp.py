"""DDP front end: a communication hook that averages gradient buckets through compression.

Two lines in a DDP script::

    state = commpress.CompressionState(codec=commpress.QSGD(bits=4))
    commpress.register_hook(ddp_model, state)   # or ddp_model.register_comm_hook(state, compress_hook)

The hook follows DDP's contract: it returns a ``Future`` of a tensor shaped like the bucket
holding the *mean* of the gradients over ranks. Each bucket's reduction runs on one background
thread per state, in bucket order (see :mod:`commpress.comm.ordered`), so communication
overlaps the rest of the backward pass.
"""

import logging
import warnings
import weakref
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .codecs import Codec
from .comm.agreement import agree
from .comm.calibration import CALIBRATED
from .comm.ordered import OrderedExecutor
from .comm.transport import (TorchTransport, Transport, new_group, node_layout,
                             torch_hierarchical_transport)
from .engine.averaging import Group
from .engine.reduction import split_segments
from .engine.runtime import Runtime, close_when_collected
from .engine.state import EngineState
from .feedback import ErrorFeedback
from .names import split_name, state_of

logger = logging.getLogger("commpress")

#: gradient dtypes the hook reduces (float64 is reduced in float32 and written back)
_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _two_models_error() -> RuntimeError:
    return RuntimeError("commpress: this CompressionState is used by more than one DDP model; it "
                        "counts steps and keeps error-feedback memories for one model. Create one "
                        "state per model (e.g. one for the generator, one for the discriminator)")


class CompressionState(EngineState):
    """Configuration and memory of :func:`compress_hook`.

    Args:
        codec: the :class:`~commpress.Codec` applied to each bucket's large layers.
        process_group: the group to reduce over (None: the DDP model's own group when registered
            with :func:`register_hook`, else the default group).
        collective: ``"allgather"``, ``"reduce_scatter"``, ``"allreduce"`` (summable codecs
            only), ``"hierarchical"`` (fp32 inside a node, compressed between nodes; nodes from
            torchrun's ``GROUP_RANK``, see :func:`commpress.comm.transport.node_id`) or
            ``"auto"`` (a cost model, see :func:`commpress.comm.collectives.choose_algorithm`,
            hierarchical when there are several nodes of the same number of ranks).
        error_feedback: None, ``"ef"`` or ``"ef21"`` (see :mod:`commpress.feedback`).
        server_feedback: with ``"ef"``, also keep the residual of ``reduce_scatter``'s second
            quantization at the reducing rank (``"ef21"`` always keeps it).
        start_iter: plain fp32 all-reduce for the first ``start_iter`` steps; must be >= 2 with
            error feedback, because DDP rebuilds its buckets after the first iteration.
        min_numel: parameters with fewer elements, and all 1-D ones (biases, norms), are sent
            uncompressed in one fp32 all-reduce per bucket: compressing them saves little and
            costs accuracy.
        seed: stochastic rounding on rank ``r`` uses a generator seeded from ``(seed, r)``, so
            noise is independent across ranks and runs are reproducible.
        log_every: log :attr:`stats` on rank 0 every this many steps (0: never).
        policy: ``"calibrated"`` (default): compress only the buckets where it pays, as
            measured (see :class:`commpress.engine.policy.CalibratedPolicy`): the fp32 and fp16
            all-reduces and ``codec`` timed per bucket in step ``max(start_iter - 1, 1)``, the
            close plans then tried over real steps, the fastest adopted on every rank; on a fast
            link, or on one node, nothing is compressed. ``"fixed"``: ``codec`` on every bucket
            from ``start_iter`` on, whatever it costs (studies, exact reproductions).
        recalibrate_every: with ``"calibrated"``, every this many steps after a plan, ranks
            vote on whether the reduction time per step moved by more than 2x and, if any saw
            it, calibrate again (0: never).
        plan: with ``"calibrated"``, pin the plan instead of measuring one: a previous run's
            ``state.plan`` state dict (or its whole :meth:`state_dict`), or a JSON file of
            either (:meth:`save_plan`); a run's numerics then do not depend on timings.

    The plan (:attr:`plan`) is the same on every rank, in :meth:`state_dict` (with the trial
    steps' progress), in :attr:`stats`' summary and, on rank 0, in the log. Process groups and
    the worker thread are created by :func:`register_hook` (or at the first hook call), after
    one check that every rank has the same configuration; :meth:`close` (or dropping the
    state, or ``with state:``) releases them. One state serves one model. float64 gradients
    are reduced in float32; sparse gradients are not supported. Like PyTorch's
    ``PowerSGDState``, it pickles without its process group (which falls back to the default
    group).

    Example::

        >>> state = CompressionState(codec=QSGD(bits=4), collective="auto", error_feedback=None)
        >>> commpress.register_hook(ddp_model, state)
        >>> ...train...
        >>> print(state.stats.summary())
    """

    def __init__(self, codec: Codec, process_group: Optional[dist.ProcessGroup] = None,
                 collective: str = "auto", error_feedback: Optional[str] = None,
                 server_feedback: bool = False, start_iter: int = 2, min_numel: int = 1024,
                 seed: int = 0, log_every: int = 100, policy: str = CALIBRATED,
                 recalibrate_every: int = 1000, plan=None):
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None (the "
                            f"DDP model's group), got {type(process_group).__name__}")
        #: the reduction of the buckets: policy, feedback, statistics, step (see
        #: :mod:`commpress.engine.reduction`)
        super().__init__(codec, collective, error_feedback, server_feedback, seed, policy,
                         start_iter, min_numel, recalibrate_every, plan, "bucket", log_every)
        if self.error_feedback is not None and start_iter < 2:
            raise ValueError("start_iter must be >= 2 with error feedback: DDP rebuilds its "
                             "buckets after the first iteration")
        self.process_group = process_group
        self.log_every = log_every
        # this process's runtime and bookkeeping (not pickled, not in state_dict)
        self.param_index: Dict[torch.Tensor, int] = {}
        # the runtime, once created: its only strong reference, so that the finalizer
        # decides on which thread it dies (see engine.runtime.close_when_collected)
        self._runtime_box: List[Runtime] = []
        self._release = None
        self._closed = False
        self._model = None              # weak reference to the model bound by register_hook
        self._layout_known = False      # direct registration: parameters learnt from buckets
        self._indices_seen: set = set()

    # -- runtime: created eagerly on the caller's thread ------------------------------------
    @property
    def _runtime(self) -> Optional[Runtime]:
        return self._runtime_box[0] if self._runtime_box else None

    def _ensure_runtime(self, device: Optional[torch.device] = None) -> Runtime:
        """Create the private group (and node groups), check that every rank is configured
        alike, start the worker thread. Collective over the group's ranks: every rank reaches
        it at the same point (registration, or its first hook call). ``device``: the model's
        (the bucket's), where NCCL wants the few tensors of this setup."""
        if self._runtime is not None:
            return self._runtime
        if self._closed:
            raise RuntimeError("commpress: this CompressionState was closed")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group() first")
        runtime = _group_runtime(self.process_group or dist.group.WORLD, device,
                                 self._agreement_fields(), self.collective, self.codec.summable)
        self._runtime_box.append(runtime)
        self._release = weakref.finalize(self, close_when_collected, self._runtime_box)
        self._check_loaded_rank()
        return runtime

    @property
    def transport(self) -> TorchTransport:
        """The transport over this state's private copy of ``process_group``."""
        return self._ensure_runtime().transport

    @property
    def control_transport(self) -> TorchTransport:
        """Where ranks check that they agree (see :func:`commpress.comm.agreement.agree`): a
        CPU (gloo) group beside an NCCL one, so checks need no device->host copy."""
        return self._ensure_runtime().control

    @property
    def compressed_transport(self) -> Transport:
        """The transport of the compressed reductions: :attr:`transport`, or for the
        hierarchical collective (and ``auto`` on several nodes of several ranks) one that also
        holds node-local and cross-node groups."""
        return self._ensure_runtime().compressed_transport

    @property
    def executor(self) -> OrderedExecutor:
        return self._ensure_runtime().executor

    def close(self) -> None:
        """Stop the worker thread and destroy this state's process groups (after the reductions
        already submitted). The hook refuses to run afterwards."""
        if self._release is not None and self._release.detach() is not None:
            self._runtime_box.pop().close()  # here and now, on the caller's thread
        self._runtime_box.clear()
        self._release, self._closed = None, True

    def __enter__(self) -> "CompressionState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        return self.engine.generator(device, self.transport.rank)

    def set_masks(self, masks: Dict[torch.Tensor, torch.Tensor]) -> None:
        """Send only the gradient entries where ``masks[param]`` is true (zeros elsewhere);
        ``{}`` sends everything. Drops the error-feedback memories of masked-out entries.
        Called by :class:`commpress.ACDC` at every prune and restore."""
        self.engine.set_masks(masks)

    def bind(self, model: torch.nn.Module) -> "CompressionState":
        """Learn the model: its parameters' names (so error-feedback memories can be
        checkpointed) and order (so compression does not depend on DDP's bucket order), and a
        DDP model's process group (the default for ``process_group``). Refuses a second model,
        and models with sparse gradients. :func:`register_hook` calls it."""
        module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        if self._model is not None and self._model() is not module:
            raise _two_models_error()
        sparse = [name or type(m).__name__ for name, m in module.named_modules()
                  if getattr(m, "sparse", False) is True]
        if sparse:
            raise ValueError(f"commpress: {', '.join(sparse)} produce sparse gradients, which the "
                             "compression hook does not support; use sparse=False, or a separate "
                             "uncompressed DDP model for them")
        group = getattr(model, "process_group", None)
        if group is not None and self.process_group is not group:
            if self.process_group is not None:
                raise ValueError("commpress: the state's process_group is not the DDP model's; "
                                 "leave process_group=None to use the model's group")
            if self._runtime is not None:
                raise ValueError("commpress: this state already communicates over another group")
            self.process_group = group
        self.param_index = {p: i for i, p in enumerate(module.parameters())}
        if self.feedback is not None:
            self.feedback.bind(module.named_parameters())
        self._model = weakref.ref(module)
        self._layout_known = True
        return self

    def _learn(self, index: int, params: List[torch.Tensor], last: bool) -> None:
        """Check that ``params`` (a bucket's) belong to this state's model. A state registered
        directly with ``ddp.register_comm_hook`` learns its parameters in the first step of the
        process instead, naming them ``param.K`` in the order DDP first presents them (the same
        in every run of the same model)."""
        if self._layout_known:
            if any(p not in self.param_index for p in params):
                raise _two_models_error()
            return
        if index in self._indices_seen:
            raise _two_models_error()
        self._indices_seen.add(index)
        for p in params:
            self.param_index.setdefault(p, len(self.param_index))
        if last:
            self._layout_known = True
            if self.feedback is not None:
                self.feedback.bind((f"param.{k}", p) for p, k in self.param_index.items())

    # -- persistence ----------------------------------------------------------------------
    def __getstate__(self):
        """Pickles as its constructor's arguments and :meth:`state_dict` (memories by parameter
        name), without process group or runtime, like PyTorch's ``PowerSGDState``."""
        args = dict(codec=self.codec, collective=self.collective,
                    error_feedback=self.error_feedback, server_feedback=self.server_feedback,
                    start_iter=self.start_iter, min_numel=self.min_numel, seed=self.seed,
                    log_every=self.log_every, policy=self.policy,
                    recalibrate_every=self.recalibrate_every,
                    plan=self.plan.state_dict() if self._policy.pinned else None)
        try:
            saved = self.state_dict()
        except RuntimeError as exc:  # memories of parameters that were never named
            warnings.warn(f"commpress: pickling a CompressionState drops its error-feedback "
                          f"memories ({exc}); a resumed run will drift", stacklevel=2)
            engine = self.engine
            kept, engine.feedback = engine.feedback, ErrorFeedback(self.error_feedback,
                                                                   self.server_feedback)
            try:
                saved = self.state_dict()
            finally:
                engine.feedback = kept
        return {"args": args, "state": saved}

    def __setstate__(self, pickled):
        self.__init__(**pickled["args"])
        self.load_state_dict(pickled["state"])
        logger.warning("CompressionState unpickled: process_group is not serializable and was "
                       "reset to the default group")


def _group_runtime(group: dist.ProcessGroup, device: Optional[torch.device], fields: Dict,
                   collective: str, summable: bool) -> Runtime:
    """A DDP state's runtime over a private copy of ``group``, after checking that every rank
    agrees on ``fields``: with a gloo control group beside another backend, and for the
    hierarchical collective (or ``auto`` on several nodes of the same number of ranks) the
    node groups. ``device``: the model's, where NCCL wants the few tensors of this setup."""
    # A private copy of the group: DDP issues collectives of its own on the user's group
    # (e.g. the unused-parameter map) from the backward thread while the hook's reductions
    # run on the worker; sharing one group would let them interleave differently per rank.
    ranks, backend = dist.get_process_group_ranks(group), dist.get_backend(group)
    every_rank_calls = len(ranks) == dist.get_world_size()
    private = new_group(ranks, group, every_rank_calls=every_rank_calls)
    if backend != "nccl":
        device = None  # the group's default: CPU for gloo
    control = None
    if backend != "gloo":
        control = TorchTransport(new_group(ranks, group, every_rank_calls=every_rank_calls,
                                           backend="gloo"))
    runtime = Runtime(TorchTransport(private, device), control)
    try:
        transport = runtime.transport
        agree(runtime.control, fields, runtime.control.device)
        auto = collective == "auto" and not summable
        if collective == "hierarchical" or auto:
            layout = node_layout(transport)
            even = len({len(ranks) for ranks in layout}) == 1
            if collective == "hierarchical" and len(layout) == 1:
                warnings.warn("commpress: collective 'hierarchical' with every rank on one "
                              "node: it reduces in fp32 inside a node and compresses only "
                              "between nodes, so nothing is compressed here; use 'auto' or "
                              "a flat collective to compress across these ranks",
                              stacklevel=4)
            if collective == "hierarchical" or (even and 1 < len(layout) < transport.world_size):
                runtime.compressed_transport = torch_hierarchical_transport(transport, layout)
                runtime.groups += [runtime.compressed_transport.intra.group,
                                   runtime.compressed_transport.inter.group]
            elif not even:
                logger.info("commpress: nodes hold different numbers of ranks (%s): 'auto' "
                            "uses flat collectives", [len(r) for r in layout])
    except BaseException:
        runtime.close()
        raise
    return runtime


def _check_buffer(buffer: torch.Tensor) -> None:
    if buffer.layout != torch.strided:
        raise TypeError("commpress: sparse gradients (e.g. nn.Embedding(sparse=True)) are not "
                        "supported by the compression hook; use sparse=False")
    if buffer.dtype not in _GRAD_DTYPES:
        raise TypeError(f"commpress: gradients of dtype {buffer.dtype} are not supported "
                        f"(float32, float16, bfloat16, float64)")


def compress_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean over ranks of ``bucket``, compressed with
    ``state.codec`` from step ``state.start_iter`` on (plain fp32 all-reduce before).

    Example::

        >>> state = CompressionState(codec=NaturalCompression())
        >>> ddp_model.register_comm_hook(state, compress_hook)
    """
    if not isinstance(state, CompressionState):
        raise TypeError(f"compress_hook's state must be a commpress CompressionState, got "
                        f"{type(state).__name__} (e.g. commpress.state_from_name('qsgd4'))")
    if isinstance(bucket, torch.Tensor):
        raise TypeError("compress_hook is a DDP communication hook and takes a GradBucket; it "
                        "got a tensor, as FSDP's communication hooks pass: FSDP is not supported")
    buffer, index, last = bucket.buffer(), bucket.index(), bucket.is_last()
    _check_buffer(buffer)
    state._learn(index, bucket.parameters(), last)
    device = buffer.device  # from the bucket, never from another thread's current device
    runtime = state._ensure_runtime(device)  # on this (the backward's) thread, never the worker
    # in model order when bound: DDP's first iteration uses registration order, later ones
    # the order in which gradients become ready
    small, big = split_segments(bucket.parameters(), state.min_numel, state.param_index)
    return state.engine.issue(runtime, index, last, Group(buffer, small, big),
                              compress=state.iter >= state.start_iter)


def state_from_name(name: str, **kwargs) -> CompressionState:
    """``"qsgd4"``, ``"natural"``, ... (see :func:`named_hooks`) with an optional ``+ef`` or
    ``+ef21`` suffix, e.g. ``"qsgd4+ef"``; keyword arguments go to :class:`CompressionState`."""
    factory, feedback = split_name(name)  # refuses a non-name with the known names
    if feedback:
        kwargs["error_feedback"] = feedback
    return CompressionState(codec=factory(), **kwargs)


def register_hook(model: torch.nn.parallel.DistributedDataParallel, state, **kwargs) -> CompressionState:
    """Register :func:`compress_hook` on ``model`` with ``state`` (a :class:`CompressionState`,
    a name for :func:`state_from_name`, or a :class:`~commpress.Codec`; ``kwargs`` go to the
    state made from a name or codec): names parameters for checkpoints, takes the model's
    process group, and creates the state's groups and worker thread now, on this thread (every
    rank must call it at the same point, like DDP's constructor). Returns the state.

    Example::

        >>> state = commpress.register_hook(ddp_model, "qsgd4+ef")
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_hook takes a DistributedDataParallel model, got "
                        f"{type(model).__name__}: wrap it first, DDP(model), then register")
    state = state_of(state, CompressionState, CompressionState, "register_hook", **kwargs)
    state.bind(model)
    model.register_comm_hook(state, compress_hook)
    first = next(iter(model.parameters()), None)
    state._ensure_runtime(first.device if first is not None else None)
    return state
