"""DDP front end: a communication hook that averages gradient buckets through compression.

Two lines in a DDP script::

    state = commpress.CompressionState(codec=commpress.QSGD(bits=4))
    commpress.register_hook(ddp_model, state)   # or ddp_model.register_comm_hook(state, compress_hook)

The hook follows DDP's contract: it returns a ``Future`` of a tensor shaped like the bucket
holding the *mean* of the gradients over ranks. Each bucket's reduction runs on one background
thread per state, in bucket order (see :mod:`commpress.comm.ordered`), so communication
overlaps the rest of the backward pass.
"""

import json
import logging
import time
import warnings
import weakref
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .codecs import FP16, Codec, Identity
from .comm.masks import GradientMask
from .comm.agreement import agree
from .comm.calibration import (CALIBRATED, FP32, POLICIES, SAMPLE_NUMEL, Candidate, CudaTimer, Plan,
                               candidates)
from .config import CompressionConfig
from .comm.ordered import OrderedExecutor
from .engine.policy import make_policy, report_plan
from .engine.runtime import Runtime, close_when_collected
from .comm.transport import (HierarchicalTransport, TorchTransport, Transport,
                             new_group, node_layout, torch_hierarchical_transport)
from .comm.collectives import start_mean
from .comm.pipeline import reduce_gradient
from .comm.segments import Segments
from .feedback import ErrorFeedback, flat_numel
from .names import split_name, state_of
from .stats import CommStats

logger = logging.getLogger("commpress")

_FP32, _FP16 = Identity(), FP16()
#: gradient dtypes the hook reduces (float64 is reduced in float32 and written back)
_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: every bucket's layout is checked across ranks in this many first steps of a process (DDP
#: rebuilds its buckets after the first; later checks happen whenever a bucket changes)
_LAYOUT_CHECK_STEPS = 3


def _two_models_error() -> RuntimeError:
    return RuntimeError("commpress: this CompressionState is used by more than one DDP model; it "
                        "counts steps and keeps error-feedback memories for one model. Create one "
                        "state per model (e.g. one for the generator, one for the discriminator)")


class CompressionState:
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
        policy: ``"calibrated"`` (default): in a warm-up step (step ``max(start_iter - 1, 1)``,
            after DDP's bucket rebuild) time, per bucket, the fp32 all-reduce, an fp16
            all-reduce and ``codec`` under each applicable collective (only ``collective`` when
            one is named), on the real buckets and group; pick per bucket the most exact choice
            within 5% of the fastest; then let the plans that come near (all-fp32, all-fp16,
            that per-bucket plan) run 5 real steps each and adopt the fastest (see
            :mod:`commpress.comm.calibration`). A step is then not slower than fp32 by more
            than the timing noise, and on a fast link, or on one node, nothing is compressed. ``"fixed"``: ``codec`` on every bucket
            from ``start_iter`` on, whatever it costs (studies, exact reproductions of a method).
        recalibrate_every: with ``"calibrated"``, every this many steps after a plan, ranks
            agree whether the reduction time per step moved by more than 2x (a congested or a
            freed link) and, if any saw it, calibrate again (0: never).
        plan: with ``"calibrated"``, pin the plan instead of measuring one: a previous run's
            ``state.plan.state_dict()`` (or its whole :meth:`state_dict`), or the path of a
            JSON file holding either (see :meth:`save_plan`). The policy then never times
            anything, so a run's numerics do not depend on timings (reproducible runs, tests).

    The plan (:attr:`plan`) is the same on every rank, in :meth:`state_dict` (a resumed run
    reduces as the original did; a checkpoint saved during the trial steps holds their
    progress, so the resumed run goes on with the same trial plans), in :attr:`stats`'
    summary (which says when error feedback is idle because no bucket uses the codec) and, on
    rank 0, in the log.

    Its process groups and worker thread are created on the caller's thread by
    :func:`register_hook` (or at the first hook call), after one check that every rank has the
    same configuration; :meth:`close` (or dropping the state, or ``with state:``) releases them.
    One state serves one model. float64 gradients are reduced in float32; sparse gradients are
    not supported.

    Like PyTorch's ``PowerSGDState``, it pickles without its process group (which falls back to
    the default group) and has ``state_dict()``/``load_state_dict()`` covering the step
    counter, the error-feedback memories, the random generators and the statistics.

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
        self.config = CompressionConfig(codec, collective, error_feedback, server_feedback, seed)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        for name, value in (("recalibrate_every", recalibrate_every), ("start_iter", start_iter),
                            ("min_numel", min_numel), ("log_every", log_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None (the "
                            f"DDP model's group), got {type(process_group).__name__}")
        self.policy = policy
        self.recalibrate_every = recalibrate_every
        if error_feedback is not None and start_iter < 2:
            raise ValueError("start_iter must be >= 2 with error feedback: DDP rebuilds its "
                             "buckets after the first iteration")
        self.process_group = process_group
        self.start_iter = start_iter
        self.min_numel = min_numel
        self.log_every = log_every
        self.iter = 0
        self.stats = CommStats()
        #: AC/DC phase ("dense" or "sparse") and per-phase statistics, set by :class:`commpress.ACDC`
        self.phase = "dense"
        self.phase_stats = {"dense": CommStats(), "sparse": CommStats()}
        self.feedback = ErrorFeedback(error_feedback, server_feedback) if error_feedback else None
        #: how each bucket of a step is reduced (see :mod:`commpress.engine.policy`)
        self._policy = make_policy(policy, codec, collective, start_iter, recalibrate_every, plan)
        self._describe_plan()
        # this process's runtime and bookkeeping (not pickled, not in state_dict)
        self.param_index: Dict[torch.Tensor, int] = {}
        self.mask = GradientMask()      # the AC/DC policy: which entries to send
        # the runtime, once created: its only strong reference, so that the finalizer
        # decides on which thread it dies (see engine.runtime.close_when_collected)
        self._runtime_box: List[Runtime] = []
        self._release = None
        self._closed = False
        self._model = None              # weak reference to the model bound by register_hook
        self._layout_known = False      # direct registration: parameters learnt from buckets
        self._indices_seen: set = set()
        self._process_steps = 0
        self._failed_step: Optional[int] = None  # a step in which a bucket's reduction failed
        self._agreed_layout: Dict[int, tuple] = {}
        self._generators: Dict[str, torch.Generator] = {}
        self._saved_rng: Dict[str, torch.Tensor] = {}
        self._reseed_at: Optional[int] = None
        self._loaded_from: Optional[tuple] = None  # (rank, world size) of a loaded checkpoint

    # the shared configuration, read-only
    codec = property(lambda self: self.config.codec)
    collective = property(lambda self: self.config.collective)
    error_feedback = property(lambda self: self.config.error_feedback)
    server_feedback = property(lambda self: self.config.server_feedback)
    seed = property(lambda self: self.config.seed)

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
        group = self.process_group or dist.group.WORLD
        # A private copy of the group: DDP issues collectives of its own on the user's group
        # (e.g. the unused-parameter map) from the backward thread while the hook's reductions
        # run on the worker; sharing one group would let them interleave differently per rank.
        ranks = dist.get_process_group_ranks(group)
        private = new_group(ranks, group, every_rank_calls=len(ranks) == dist.get_world_size())
        if device is None or dist.get_backend(group) != "nccl":
            device = None  # the group's default: CPU for gloo
        control = None
        if dist.get_backend(group) != "gloo":
            control = TorchTransport(new_group(ranks, group, every_rank_calls=len(ranks) ==
                                               dist.get_world_size(), backend="gloo"))
        runtime = Runtime(TorchTransport(private, device), control)
        try:
            transport = runtime.transport
            agree(runtime.control, self._agreement_fields(), runtime.control.device)
            auto = self.collective == "auto" and not self.codec.summable
            if self.collective == "hierarchical" or auto:
                layout = node_layout(transport)
                even = len({len(ranks) for ranks in layout}) == 1
                if self.collective == "hierarchical" and len(layout) == 1:
                    warnings.warn("commpress: collective 'hierarchical' with every rank on one "
                                  "node: it reduces in fp32 inside a node and compresses only "
                                  "between nodes, so nothing is compressed here; use 'auto' or "
                                  "a flat collective to compress across these ranks",
                                  stacklevel=3)
                if self.collective == "hierarchical" or (even and 1 < len(layout) < transport.world_size):
                    runtime.compressed_transport = torch_hierarchical_transport(transport, layout)
                    runtime.groups += [runtime.compressed_transport.intra.group,
                                       runtime.compressed_transport.inter.group]
                elif not even:
                    logger.info("commpress: nodes hold different numbers of ranks (%s): 'auto' "
                                "uses flat collectives", [len(r) for r in layout])
        except BaseException:
            runtime.close()
            raise
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
        if not self.codec.stochastic:
            return None
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            if key in self._saved_rng:
                gen.set_state(self._saved_rng.pop(key))
            else:
                seed = self.config.rank_seed(self.transport.rank)
                if self._reseed_at is not None:  # re-derived after a checkpoint of another rank
                    seed = (seed * 1_000_033 + self._reseed_at) % (1 << 62)
                gen.manual_seed(seed)
            self._generators[key] = gen
        return self._generators[key]

    # -- the policy -----------------------------------------------------------------------
    @property
    def plan(self) -> Optional[Plan]:
        """The calibrated policy's choice per bucket size (None until calibrated, and under
        ``policy="fixed"``)."""
        return self._policy.plan

    def _candidates(self, runtime: Runtime):
        return candidates(self.codec, self.collective, runtime.transport.world_size,
                          isinstance(runtime.compressed_transport, HierarchicalTransport))

    def _begin_step(self, step: int, compress: bool, runtime: Runtime, device: torch.device) -> None:
        """The policy at a step's first bucket, on the hook's thread while nothing of the step
        is in flight (see :meth:`CalibratedPolicy.begin_step`)."""
        before = self._policy.plan
        self._policy.begin_step(step, compress, runtime.control, device, runtime.inline)
        if self._policy.plan is not before:
            self._announce_plan(runtime)

    def _calibration_done(self, runtime: Runtime) -> None:
        """After a calibration step (worker thread, its last bucket)."""
        before = self._policy.plan
        self._policy.calibration_done(self._candidates(runtime))
        if self._policy.plan is not before:
            self._announce_plan(runtime)

    def _announce_plan(self, runtime: Runtime) -> None:
        report_plan(self.stats, self.plan, self.codec, self.error_feedback, runtime.transport.rank)

    def _describe_plan(self) -> None:
        report_plan(self.stats, self.plan, self.codec, self.error_feedback)

    def save_plan(self, path) -> None:
        """Write :attr:`plan` as JSON, for ``CompressionState(..., plan=path)`` in later runs."""
        if self.plan is None:
            raise RuntimeError("commpress: no plan yet (the calibrated policy adopts one after "
                               "its trial steps; policy='fixed' has none)")
        with open(path, "w") as f:
            json.dump(self.plan.state_dict(), f, indent=1)

    def set_masks(self, masks: Dict[torch.Tensor, torch.Tensor]) -> None:
        """Send only the gradient entries where ``masks[param]`` is true (zeros elsewhere);
        ``{}`` sends everything. Drops the error-feedback memories of masked-out entries.
        Called by :class:`commpress.ACDC` at every prune and restore."""
        self.mask.set(masks)
        if self.feedback is not None and masks:
            self.feedback.mask_(self.mask.masks)  # flat, as the memories are

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

    def _layout_fields(self, index: int, buffer: torch.Tensor, small, big, compress: bool,
                       phase: str) -> Optional[Dict]:
        """What ranks must agree on before this bucket's reduction, or None when nothing is
        due: the step (at every step's first bucket) and the bucket's layout (in the first
        steps of the process, then whenever it changes). Decided from counters every rank
        shares, so every rank checks at the same buckets."""
        fields: Dict = {}
        if index == 0:
            fields.update(step=self.iter, phase=phase, compress=compress)
        layout = (buffer.numel(), str(buffer.dtype), [n for _, n, _ in small],
                  [n for _, n, _ in big], compress, phase, bool(self.mask))
        if self._process_steps < _LAYOUT_CHECK_STEPS or self._agreed_layout.get(index) != layout:
            fields.update(bucket=index, layout=layout)
            self._agreed_layout[index] = layout
        return fields or None

    # -- persistence ----------------------------------------------------------------------
    def _config(self) -> Dict:
        return {**self.config.describe(), "start_iter": self.start_iter,
                "min_numel": self.min_numel, "policy": self.policy}

    def _agreement_fields(self) -> Dict:
        return {**self.config.shared(), "start_iter": self.start_iter,
                "min_numel": self.min_numel, "iter": self.iter, "phase": self.phase,
                "policy": self.policy, "recalibrate_every": self.recalibrate_every,
                "plan": self.plan.state_dict() if self.plan else None}

    def state_dict(self) -> Dict:
        rng = {key: gen.get_state() for key, gen in self._generators.items()}
        origin = ((self._runtime.transport.rank, self._runtime.transport.world_size)
                  if self._runtime is not None else self._loaded_from)
        return {"config": self._config(), "iter": self.iter, "rng": {**self._saved_rng, **rng},
                "feedback": self.feedback.state_dict() if self.feedback else None,
                "stats": self.stats.state_dict(), "phase": self.phase,
                "phase_stats": {k: v.state_dict() for k, v in self.phase_stats.items()},
                "rank": origin[0] if origin else None,
                "world_size": origin[1] if origin else None,
                **self._policy.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        """Restore :meth:`state_dict`, after checking every entry (a wrong one is refused with
        its name). A checkpoint saved by another rank (the habit of saving on rank 0 and
        loading everywhere) is accepted with a warning: this rank's random generator is
        re-derived from (seed, rank, step) so rounding noise stays independent across ranks,
        and the per-rank memories are reset consistently (see
        :meth:`ErrorFeedback.adopt_other_rank`)."""
        _validate_state(state, self._config(), self.feedback)
        self._policy.load_state_dict(state.get("plan"), state.get("calibration"))
        self.iter = state["iter"]
        self._generators, self._saved_rng = {}, dict(state["rng"])
        if self.feedback is not None:
            self.feedback.load_state_dict(state["feedback"])
        self.stats.load_state_dict(state["stats"])
        self._describe_plan()
        self.phase = state["phase"]
        for phase, saved in state["phase_stats"].items():
            self.phase_stats[phase].load_state_dict(saved)
        rank, world = state.get("rank"), state.get("world_size")
        self._loaded_from = (rank, world) if rank is not None else None
        self._check_loaded_rank()

    def _check_loaded_rank(self) -> None:
        if self._loaded_from is None or self._runtime is None:
            return  # checked when the runtime starts
        transport = self._runtime.transport
        if self._loaded_from != (transport.rank, transport.world_size):
            logger.warning("commpress: loaded a checkpoint of rank %d of %d on rank %d of %d: "
                           "re-deriving this rank's random generator from (seed, rank, step) and "
                           "resetting per-rank error-feedback memories. Save one checkpoint per "
                           "rank to resume exactly.", *self._loaded_from, transport.rank,
                           transport.world_size)
            self._saved_rng, self._generators, self._reseed_at = {}, {}, self.iter
            if self.feedback is not None:
                self.feedback.adopt_other_rank()
        self._loaded_from = None

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
            self_feedback, self.feedback = self.feedback, ErrorFeedback(self.error_feedback,
                                                                        self.server_feedback)
            saved, self.feedback = self.state_dict(), self_feedback
        return {"args": args, "state": saved}

    def __setstate__(self, pickled):
        self.__init__(**pickled["args"])
        self.load_state_dict(pickled["state"])
        logger.warning("CompressionState unpickled: process_group is not serializable and was "
                       "reset to the default group")


def _validate_state(state: Dict, config: Dict, feedback: Optional[ErrorFeedback]) -> None:
    """Refuse a state dict with a missing, unknown or malformed entry, naming it."""
    if not isinstance(state, dict):
        raise TypeError(f"a CompressionState state dict is a dict, got {type(state).__name__}")
    required = ("config", "iter", "rng", "feedback", "stats", "phase", "phase_stats")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"checkpoint misses entries {missing}")
    unknown = sorted(set(state) - set(required) - {"rank", "world_size", "plan", "calibration"})
    if unknown:
        raise ValueError(f"checkpoint has unknown entries {unknown}")
    saved = state["config"]
    if isinstance(saved, dict) and "policy" not in saved:  # before policies: the codec everywhere
        saved = {**saved, "policy": "fixed"}
    if saved != config:
        differing = sorted(k for k in set(config) | set(saved if isinstance(saved, dict) else {})
                           if not isinstance(saved, dict) or saved.get(k) != config.get(k))
        raise ValueError(f"checkpoint was made with another configuration (differing: "
                         f"{', '.join(differing)}): {saved}, this state is {config}")
    if not isinstance(state["iter"], int) or isinstance(state["iter"], bool) or state["iter"] < 0:
        raise ValueError(f"checkpoint entry 'iter' must be a non-negative integer, got {state['iter']!r}")
    if state["phase"] not in ("dense", "sparse"):
        raise ValueError(f"checkpoint entry 'phase' must be 'dense' or 'sparse', got {state['phase']!r}")
    for key in ("rank", "world_size"):
        value = state.get(key)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"checkpoint entry {key!r} must be a non-negative integer, got {value!r}")
    if not isinstance(state["rng"], dict):
        raise ValueError("checkpoint entry 'rng' must map devices to generator states")
    for device, rng in state["rng"].items():
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
            raise ValueError(f"checkpoint entry rng[{device!r}] is not a generator state "
                             "(a 1-D uint8 tensor)")
        try:
            kind = torch.device(device).type
            if kind == "cpu":
                torch.Generator().set_state(rng)
            elif kind == "cuda" and torch.cuda.is_available():
                torch.Generator(device=device).set_state(rng)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"checkpoint entry rng[{device!r}] is not a valid generator state: "
                             f"{exc}") from None
    if feedback is None and state["feedback"] is not None:
        raise ValueError("checkpoint holds error-feedback memories, this state has none")
    if feedback is not None:
        feedback.validate_state_dict(state["feedback"])
    if set(state["phase_stats"]) - {"dense", "sparse"}:
        raise ValueError(f"checkpoint entry 'phase_stats' has unknown phases "
                         f"{sorted(set(state['phase_stats']) - {'dense', 'sparse'})}")


def _segments(state: CompressionState, bucket):
    """Where each parameter's gradient lies in the bucket buffer: ``(small, big)``, lists of
    ``(offset, numel, param)`` for the parameters sent uncompressed and compressed. ``big`` is
    in model order when the model is bound, so a bucket compresses the same vector whichever
    order DDP put it in (DDP's first iteration uses registration order, later ones the order
    gradients become ready): this is what makes a resumed run bit-identical."""
    small, big, offset = [], [], 0
    for p in bucket.parameters():
        numel = flat_numel(p)  # a complex parameter's gradient lies in the bucket as reals
        compress = p.dim() >= 2 and numel >= state.min_numel
        (big if compress else small).append((offset, numel, p))
        offset += numel
    if state.param_index:
        big.sort(key=lambda seg: state.param_index.get(seg[2], -1))
    return small, big


def _reduce_group(state: CompressionState, buffer, segments, codec, collective,
                  feedback: Optional[ErrorFeedback], transport: Transport,
                  generator: Optional[torch.Generator], stats: Optional[CommStats]) -> None:
    """Average the gradients of ``segments`` over ranks through ``codec``, in place (where
    they lie in the bucket, without gathering them, when nothing needs them gathered)."""
    params = [p for _, _, p in segments]
    reduce_gradient(Segments([buffer[o:o + n] for o, n, _ in segments]), params, codec, transport,
                    collective, feedback, generator, stats,
                    keep=state.mask.kept_indices(params, buffer.device), agreed=True)


def _reduce_as(state: CompressionState, runtime: Runtime, buffer, small, big, choice: Candidate,
               generator: Optional[torch.Generator], stats: Optional[CommStats],
               feedback: Optional[ErrorFeedback]) -> None:
    """Average ``buffer`` over ranks in place as ``choice`` says: the small layers in fp32, the
    large ones through the choice's codec and collective (everything in one fp32 all-reduce
    when the choice is fp32). Error feedback applies to the configured codec only."""
    if choice == FP32:
        small, big = small + big, []
    small_done = None
    if small and big and buffer.dtype == torch.float32 and not state.mask:
        # on the wire while the large ones are encoded: a blocking all-reduce here would hold
        # back the first compressed piece by a round trip
        small_done = start_mean(Segments([buffer[o:o + n] for o, n, _ in small]), _FP32,
                                runtime.transport, stats)
    elif small:
        _reduce_group(state, buffer, small, _FP32, "allreduce", None, runtime.transport,
                      generator, stats)
    if big:
        codec = state.codec if choice.codec == "codec" else _FP16
        transport = (runtime.compressed_transport if choice.collective in ("auto", "hierarchical")
                     else runtime.transport)
        _reduce_group(state, buffer, big, codec, choice.collective,
                      feedback if choice.codec == "codec" else None, transport, generator, stats)
    if small_done is not None:
        small_done()


def _choose(state: CompressionState, runtime: Runtime, buffer, small, big, last: bool,
            compress: bool, calibrating: bool, plan: Optional[Plan]) -> Candidate:
    """How this bucket is reduced this step (worker thread, in bucket order). A calibration
    step (decided at the step's first bucket, see :class:`CalibratedPolicy`) measures every
    candidate on each bucket and reduces it in fp32."""
    if not calibrating:
        return state._policy.choose(buffer.numel(), compress, plan)
    _calibrate_bucket(state, runtime, buffer, small, big)
    if last:
        state._calibration_done(runtime)
    return FP32


def _calibrate_bucket(state: CompressionState, runtime: Runtime, buffer, small, big) -> None:
    """Time every candidate on a copy of ``buffer`` (or of a sample of it) for the pending
    plan. Candidates draw rounding noise from a generator of their own (the training's stream
    is untouched) and feed back into a scratch memory (so error feedback's cost is counted)."""
    sample, small, big = _calibration_sample(buffer, small, big)
    scratch = torch.empty_like(sample)
    generator = torch.Generator(device=buffer.device) if state.codec.stochastic else None
    if generator is not None:
        generator.manual_seed(state.config.rank_seed(runtime.transport.rank))
    feedback = ErrorFeedback(state.error_feedback, state.server_feedback) if state.feedback else None

    def run(choice):
        return lambda: _reduce_as(state, runtime, scratch, small, big, choice, generator, None,
                                  feedback)
    state._policy.calibrate(buffer.numel(), state._candidates(runtime), run, runtime.control,
                            buffer.device, prepare=lambda: scratch.copy_(sample),
                            scale=buffer.numel() / sample.numel())


def _calibration_sample(buffer: torch.Tensor, small, big):
    """``(sample, small, big)``: the bucket itself, or for one of more than
    :data:`~commpress.comm.calibration.SAMPLE_NUMEL` values its first ones, with the
    segments cut to them (a cut parameter stands in as a shape-only tensor, so the scratch
    error-feedback memory has the sample's size)."""
    cap = SAMPLE_NUMEL
    if buffer.numel() <= cap:
        return buffer, small, big

    def cut(segments):
        kept = []
        for offset, numel, param in segments:
            if offset + numel <= cap:
                kept.append((offset, numel, param))
            elif offset < cap:
                kept.append((offset, cap - offset, torch.empty(cap - offset, device="meta")))
        return kept
    return buffer[:cap], cut(small), cut(big)


def _reduce_bucket(state: CompressionState, runtime: Runtime, buffer: torch.Tensor, small, big,
                   compress: bool, calibrating: bool, plan: Optional[Plan], index: int,
                   last: bool, phase: str, fields: Optional[Dict], step: int) -> torch.Tensor:
    """One bucket's reduction (the worker thread, or inline). Once a bucket of a step has
    failed, this rank's later buckets of that step fail without communicating: the failure
    (ranks disagreeing, a peer's bad payload) is symmetric, so every rank stops there, and
    collectives issued after it would no longer pair up across ranks (and one left pending
    in gloo aborts the process at exit)."""
    if state._failed_step == step:
        raise RuntimeError(f"commpress: bucket {index} of step {step} not reduced: an earlier "
                           f"bucket of this step failed (that error is the one to read)")
    try:
        return _reduce_agreed(state, runtime, buffer, small, big, compress, calibrating, plan,
                              last, phase, fields)
    except BaseException:
        state._failed_step = step
        raise


def _reduce_agreed(state: CompressionState, runtime: Runtime, buffer: torch.Tensor, small, big,
                   compress: bool, calibrating: bool, plan: Optional[Plan], last: bool,
                   phase: str, fields: Optional[Dict]) -> torch.Tensor:
    transport = runtime.transport
    if fields is not None:
        agree(runtime.control, fields, runtime.control.device)
    w = transport.world_size
    state.stats.add(fp32_bytes=2 * (w - 1) * 4 * buffer.numel() // w)
    choice = _choose(state, runtime, buffer, small, big, last, compress, calibrating, plan)
    adopted = plan is not None and plan is state.plan  # not on trial: watched for drift
    drift = state._policy.drift if adopted else None
    # inline on a GPU the host only queues the work: time it by events (a worker thread
    # synchronizes its side stream, so its clock is the work's)
    timer = CudaTimer() if adopted and runtime.inline and buffer.is_cuda else None
    start = time.perf_counter()
    _reduce_as(state, runtime, buffer, small, big, choice, state.generator(buffer.device),
               state.stats, state.feedback)
    if timer is not None:
        drift.add_timer(timer.stop(), last)
    elif drift is not None:
        drift.add(time.perf_counter() - start, last)
    if last:
        _end_step(state, phase, transport.rank)
    return buffer


def _end_step(state: CompressionState, phase: str, rank: int) -> None:
    state.stats.end_step()
    state.phase_stats[phase].absorb(state.stats.last_step)
    if state.log_every and state.stats.steps % state.log_every == 0 and rank == 0:
        logger.info("commpress %s", state.stats.summary())


def _reduce_direct(state: CompressionState, runtime: Runtime, buffer: torch.Tensor,
                   plan: Plan, last: bool) -> torch.futures.Future:
    """A bucket under a plan whose every choice is an all-reduce (fp32 or fp16: the codec paid
    nowhere): one asynchronous all-reduce issued here, as DDP's own default, with no worker
    thread, so that such a plan costs what plain DDP costs and one small all-gather a step
    (the agreement, issued by the hook at the step's first bucket). Safe
    because no step of such a plan uses the worker (a calibration step uses only the worker,
    and DDP waits for every bucket of a step before the next begins); ranks hold the same
    plan, so they take this path at the same buckets."""
    choice = plan.entry_for(buffer.numel()).choice
    wire = (torch.float32 if choice == FP32 else
            _FP16.wire_dtype if choice.codec == "fp16" else state.codec.wire_dtype)
    w, phase = runtime.transport.world_size, state.phase
    send = buffer.div_(w) if buffer.dtype == wire else buffer.div_(w).to(wire)  # pre-divided
    state.stats.add(fp32_bytes=2 * (w - 1) * 4 * buffer.numel() // w,
                    wire_bytes=2 * (w - 1) * send.nbytes // w)
    if last:
        state.iter += 1
        state._process_steps += 1
        _end_step(state, phase, runtime.transport.rank)
    # the callback runs on the engine's thread and must not hold the state: if it held the
    # last reference, the state's finalizer would destroy the group from that group's own
    # thread ("Resource deadlock avoided", and the process aborts)
    policy = state._policy
    started, drift = policy.step_started[1], policy.drift if last and plan is state.plan else None
    timer, stats = policy.step_timer, state.stats
    issued = time.perf_counter()
    work = dist.all_reduce(send, group=runtime.transport.group, async_op=True)

    def finish(reduced: torch.futures.Future) -> torch.Tensor:
        reduced.value()  # raises the all-reduce's failure (a dead or hung peer) into DDP's wait
        if not buffer.is_cuda:  # the host clock is the all-reduce's (on a GPU: its launch only)
            stats.add(comm_seconds=time.perf_counter() - issued)
        if send is not buffer:
            buffer.copy_(send)
        if drift is not None and timer is not None:  # on the GPU: after the all-reduce's work
            drift.add_timer(timer.stop(), step_done=True)
        elif drift is not None:
            drift.add(time.perf_counter() - started, step_done=True)
        return buffer
    return work.get_future().then(finish)




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
    step, compress = state.iter, state.iter >= state.start_iter
    if index == 0:  # nothing of this step is in flight yet
        state._begin_step(step, compress, runtime, device)
    calibrating, plan = state._policy.calibrating, state._policy.step_plan
    # a plan of all-reduces only skips the worker; an AC/DC mask's compact vectors need it
    if compress and not calibrating and plan is not None and plan.all_reduce and not state.mask:
        if index == 0:  # as every path does: a rank a step or a phase apart fails, named
            agree(runtime.control, {"step": step, "phase": state.phase, "path": "all-reduce plan"},
                  runtime.control.device)
        return _reduce_direct(state, runtime, buffer, plan, last)
    small, big = _segments(state, bucket)
    phase = state.phase
    fields = state._layout_fields(index, buffer, small, big, compress, phase)
    if last:
        state.iter += 1
        state._process_steps += 1

    def reduce():
        return _reduce_bucket(state, runtime, buffer, small, big, compress, calibrating, plan,
                              index, last, phase, fields, step)

    cuda = [device] if device.type == "cuda" else None
    if runtime.inline:  # queued on this stream, in DDP's order; the future is CUDA-aware
        done = torch.futures.Future(devices=cuda) if cuda else torch.futures.Future()
        done.set_result(reduce())
        return done
    if cuda:
        reduce = _on_side_stream(reduce, runtime.side_stream(device), device)
    return runtime.executor.submit(reduce, devices=cuda)


def _on_side_stream(reduce, stream: "torch.cuda.Stream", device: torch.device):
    """``reduce`` for the worker thread: on ``stream``, after the work queued so far on the
    caller's current stream (which wrote the bucket), finished before it returns."""
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))

    def run():
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            result = reduce()
        stream.synchronize()  # the worker may block; the backward thread does not
        return result
    return run


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
