"""The reduction of a front end's gradient groups: one engine behind DDP, Horovod and MPI.

A front end cuts its gradients into groups (a DDP bucket, a Horovod group, an MPI call's
arrays), each a :class:`~.averaging.Group` (a flat buffer, the segments sent uncompressed and
through the codec), and hands them to its :class:`ReductionEngine` in the same order on every
rank (:meth:`~ReductionEngine.issue`):

1. on the thread that issues the step, :meth:`~ReductionEngine.begin_step` at its first group
   (the policy decides whether the step calibrates and which plan it runs), then
   :meth:`~ReductionEngine.ticket` for every group (what the issuing thread decided: step,
   plan, what ranks must agree on);
2. wherever the front end runs its reductions (a worker thread, or inline),
   :meth:`~ReductionEngine.reduce` with that ticket: the agreement, the policy's choice (or
   its calibration), the choice carried out by its :class:`~.averaging.GroupAverager` (the
   codec's collective with error feedback and the AC/DC mask), the statistics, the end of
   the step after its last group.

The engine holds what a resumed run needs (:meth:`~ReductionEngine.state_dict`: the step, the
random generators, the error-feedback memories, the statistics, the policy's plan and trial
progress) and knows transports, collectives and codecs, never a framework's objects; the
front end owns its runtime (:mod:`commpress.engine.runtime`) and passes it in.
"""
from __future__ import annotations

import logging
from typing import Dict, List, NamedTuple, Optional

import torch

from ..comm.agreement import agree
from ..comm.calibration import Plan
from ..comm.masks import GradientMask
from ..config import CompressionConfig
from ..feedback import ErrorFeedback
from ..layout import flat_numel
from ..stats import CommStats
from .averaging import Group, GroupAverager
from .generators import RankGenerators
from .policy import report_plan
from .runtime import Runtime

logger = logging.getLogger("commpress")

#: every group's layout is checked across ranks in this many first steps of a process (DDP
#: rebuilds its buckets after the first; later checks happen whenever a group changes)
LAYOUT_CHECK_STEPS = 3
PHASES = ("dense", "sparse")


class Ticket(NamedTuple):
    """What the issuing thread decided for one group of a step, for :meth:`ReductionEngine.reduce`."""

    step: int
    index: int
    last: bool
    compress: bool
    calibrating: bool
    plan: Optional[Plan]
    phase: str
    fields: Optional[Dict]  # what ranks agree on before this group (None: nothing due)


class ReductionEngine:
    """The reduction of one model's gradient groups, step after step (see the module
    docstring). ``policy``: a :class:`~commpress.engine.policy.FixedPolicy` or
    :class:`~commpress.engine.policy.CalibratedPolicy`; ``unit``: what the front end calls a
    group, in messages; ``log_every``: log :attr:`stats` on rank 0 every this many steps."""

    def __init__(self, config: CompressionConfig, policy, unit: str = "group",
                 log_every: int = 0):
        self.config, self.policy, self.unit, self.log_every = config, policy, unit, log_every
        self.feedback = (ErrorFeedback(config.error_feedback, config.server_feedback)
                         if config.error_feedback else None)
        self.stats = CommStats()
        #: AC/DC phase ("dense" or "sparse") and per-phase statistics
        self.phase = "dense"
        self.phase_stats = {phase: CommStats() for phase in PHASES}
        self.mask = GradientMask()       # the AC/DC policy: which entries to send
        self.averager = GroupAverager(config, self.mask)
        self.iter = 0
        self.process_steps = 0           # steps of this process (not restored by a checkpoint)
        self.failed_step: Optional[int] = None  # a step in which a group's reduction failed
        self._agreed_layout: Dict[int, tuple] = {}
        self.generators = RankGenerators(config.rank_seed)
        report_plan(self.stats, self.plan, config.codec, config.error_feedback)

    codec = property(lambda self: self.config.codec)

    @property
    def plan(self) -> Optional[Plan]:
        """The calibrated policy's choice per group size (None until adopted, and under the
        fixed policy)."""
        return self.policy.plan

    def generator(self, device: torch.device, rank: int) -> Optional[torch.Generator]:
        """This rank's rounding generator on ``device`` (None for deterministic codecs)."""
        return self.generators.get(device, rank) if self.codec.stochastic else None

    def set_masks(self, masks: Dict[torch.Tensor, torch.Tensor]) -> None:
        """Send only the gradient entries where ``masks[key]`` is true (see
        :class:`~commpress.comm.masks.GradientMask`), dropping the error-feedback memories of
        masked-out entries."""
        self.mask.set(masks)
        if self.feedback is not None and masks:
            self.feedback.mask_(self.mask.masks)  # flat, as the memories are

    # -- the issuing thread ---------------------------------------------------------------
    def begin_step(self, compress: bool, runtime: Runtime, device: torch.device) -> None:
        """At a step's first group, while nothing of the step is in flight (see
        :meth:`CalibratedPolicy.begin_step`)."""
        before = self.policy.plan
        self.policy.begin_step(self.iter, compress, runtime.control, device, runtime.inline)
        self.report_if_adopted(before, runtime.transport.rank)

    def runs_all_reduce_plan(self, compress: bool) -> bool:
        """Whether this step's plan is all-reduces only (the codec paid nowhere), which
        :meth:`reduce_direct` issues without the worker. An AC/DC mask's compact vectors need
        the worker."""
        plan = self.policy.step_plan
        return (compress and not self.policy.calibrating and plan is not None
                and plan.all_reduce and not self.mask)

    def ticket(self, index: int, last: bool, group: Group, compress: bool) -> Ticket:
        """The decisions for group ``index`` of the current step (after :meth:`begin_step`
        for its first group); the step counter advances at the last group."""
        step, phase = self.iter, self.phase
        fields: Dict = {}
        if index == 0:
            fields.update(step=step, phase=phase, compress=compress)
        # the layout: in the first steps of the process, then whenever it changes (decided
        # from counters every rank shares, so every rank checks at the same groups)
        layout = (group.buffer.numel(), str(group.buffer.dtype), [n for _, n, _ in group.small],
                  [n for _, n, _ in group.big], compress, phase, bool(self.mask))
        if self.process_steps < LAYOUT_CHECK_STEPS or self._agreed_layout.get(index) != layout:
            fields.update(**{self.unit: index}, layout=layout)
            self._agreed_layout[index] = layout
        if last:
            self._count_step()
        return Ticket(step, index, last, compress, self.policy.calibrating,
                      self.policy.step_plan, phase, fields or None)

    def issue(self, runtime: Runtime, index: int, last: bool, group: Group,
              compress: bool) -> torch.futures.Future:
        """Group ``index`` of a step (``last``: its last), in place in its buffer: the step
        begun at its first group, then the group handed to the runtime, or under a plan of
        all-reduces only issued at once (:meth:`reduce_direct`)."""
        device = group.buffer.device
        if index == 0:  # nothing of this step is in flight yet
            self.begin_step(compress, runtime, device)
        if self.runs_all_reduce_plan(compress):
            if index == 0:  # as every path does: a rank a step or a phase apart fails, named
                agree(runtime.control, {"step": self.iter, "phase": self.phase,
                                        "path": "all-reduce plan"}, runtime.control.device)
            return self.reduce_direct(runtime, group.buffer, last)
        ticket = self.ticket(index, last, group, compress)
        return runtime.run(lambda: self.reduce(runtime, group, ticket), device)

    # -- the reduction --------------------------------------------------------------------
    def reduce(self, runtime: Runtime, group: Group, ticket: Ticket) -> torch.Tensor:
        """One group's mean over ranks, in place in its buffer. Once a group of a step has
        failed, this rank's later groups of that step fail without communicating: the failure
        (ranks disagreeing, a peer's bad payload) is symmetric, so every rank stops there,
        and collectives issued after it would no longer pair up across ranks."""
        if self.failed_step == ticket.step:
            raise RuntimeError(f"commpress: {self.unit} {ticket.index} of step {ticket.step} not "
                               f"reduced: an earlier {self.unit} of this step failed (that "
                               f"error is the one to read)")
        try:
            return self._reduce_agreed(runtime, group, ticket)
        except BaseException:
            self.failed_step = ticket.step
            raise

    def _reduce_agreed(self, runtime: Runtime, group: Group, ticket: Ticket) -> torch.Tensor:
        if ticket.fields is not None:
            agree(runtime.control, ticket.fields, runtime.control.device)
        w, rank, buffer = runtime.transport.world_size, runtime.transport.rank, group.buffer
        self.stats.add(fp32_bytes=2 * (w - 1) * 4 * buffer.numel() // w)

        def calibrate():  # every candidate measured on the group, which then goes in fp32
            options = self.policy.candidates(w, runtime.hierarchical)
            self.averager.calibrate(self.policy, runtime, group, options)
            if ticket.last:
                self.calibration_done(w, runtime.hierarchical, rank)
        generator = self.generator(buffer.device, rank)
        # inline on a GPU the host only queues the work: timed by events (a worker thread
        # synchronizes its side stream, so its clock is the work's)
        self.policy.run_group(ticket, buffer.numel(), calibrate,
                              lambda choice: self.averager.average(
                                  runtime, group, choice, generator, self.stats, self.feedback),
                              cuda_timed=runtime.inline and buffer.is_cuda)
        if ticket.last:
            self.end_step(ticket.phase, rank)
        return buffer

    def _count_step(self) -> None:
        self.iter += 1
        self.process_steps += 1

    def end_step(self, phase: str, rank: int) -> None:
        self.stats.end_step()
        self.phase_stats[phase].absorb(self.stats.last_step)
        if self.log_every and self.stats.steps % self.log_every == 0 and rank == 0:
            logger.info("commpress %s", self.stats.summary())

    def reduce_direct(self, runtime: Runtime, buffer: torch.Tensor,
                      last: bool) -> torch.futures.Future:
        """A group under a plan whose every choice is an all-reduce (fp32 or fp16): one
        asynchronous all-reduce of the transport, issued here as DDP's (and Horovod's) own
        default is, not on the worker thread, so that such a plan costs what the framework's
        own reduction costs.
        Safe because no step of such a plan uses the worker (a calibration step uses only the
        worker, and the front end waits for every group of a step before the next begins);
        ranks hold the same plan, so they take this path at the same groups."""
        plan = self.policy.step_plan
        done = self.averager.all_reduce(runtime, buffer, plan.entry_for(buffer.numel()).choice,
                                        self.stats)
        if last:
            self._count_step()
            self.end_step(self.phase, runtime.transport.rank)
        return self.policy.timed_step(done) if last and plan is self.plan else done

    # -- calibration ----------------------------------------------------------------------
    def calibration_done(self, world_size: int, hierarchical: bool, rank: int) -> None:
        """After a calibration step's last group (see :meth:`CalibratedPolicy.calibration_done`)."""
        before = self.policy.plan
        self.policy.calibration_done(self.policy.candidates(world_size, hierarchical))
        self.report_if_adopted(before, rank)

    def report_if_adopted(self, before: Optional[Plan], rank: int) -> None:
        """Put the plan in :attr:`stats` (and rank 0's log) if it is not ``before`` any more."""
        if self.policy.plan is not before:
            report_plan(self.stats, self.plan, self.codec, self.config.error_feedback, rank)

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"iter": self.iter, "rng": self.generators.state_dict(),
                "feedback": self.feedback.state_dict() if self.feedback else None,
                "stats": self.stats.state_dict(), "phase": self.phase,
                "phase_stats": {k: v.state_dict() for k, v in self.phase_stats.items()},
                **self.policy.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        """Restore :meth:`state_dict` (checked first with :func:`validate_state`)."""
        self.policy.load_state_dict(state.get("plan"), state.get("calibration"))
        self.iter = state["iter"]
        self.generators.load_state_dict(state["rng"])
        if self.feedback is not None:
            self.feedback.load_state_dict(state["feedback"])
        self.stats.load_state_dict(state["stats"])
        report_plan(self.stats, self.plan, self.codec, self.config.error_feedback)
        self.phase = state["phase"]
        for phase, saved in state["phase_stats"].items():
            self.phase_stats[phase].load_state_dict(saved)

    def adopt_other_rank(self) -> None:
        """After loading another rank's checkpoint: re-derive this rank's generators from
        (seed, rank, step) so rounding noise stays independent across ranks, and reset the
        per-rank memories consistently (see :meth:`ErrorFeedback.adopt_other_rank`)."""
        self.generators.reseed(self.iter)
        if self.feedback is not None:
            self.feedback.adopt_other_rank()


def split_segments(params, min_numel: int, order: Optional[Dict] = None):
    """Where each parameter's gradient lies in a group's flat buffer (laid out in the order of
    ``params``): ``(small, big)``, lists of ``(offset, numel, param)`` for the parameters sent
    uncompressed (fewer than ``min_numel`` elements, or 1-D: biases, norms; compressing them
    saves little and costs accuracy) and through the codec. ``order`` (parameter -> index in
    the model) sorts ``big``, so a group compresses the same vector whichever order its
    parameters came in: what makes a resumed run bit-identical."""
    small, big, offset = [], [], 0
    for p in params:
        numel = flat_numel(p)  # a complex parameter's gradient lies in the buffer as reals
        compress = p.dim() >= 2 and numel >= min_numel
        (big if compress else small).append((offset, numel, p))
        offset += numel
    if order:
        big.sort(key=lambda seg: order.get(seg[2], -1))
    return small, big


def buckets(params, cap_mb: float) -> List[List[torch.Tensor]]:
    """``params`` in reverse order (the order in which backward produces their gradients),
    cut into groups of at most ``cap_mb`` MB of fp32 gradients, as DDP's buckets are."""
    if cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {cap_mb}")
    cap, groups, current, current_bytes = cap_mb * 2 ** 20, [], [], 0
    for p in reversed(list(params)):
        if current and current_bytes + 4 * p.numel() > cap:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += 4 * p.numel()
    return groups + ([current] if current else [])


#: the entries of :meth:`ReductionEngine.state_dict` a checkpoint must hold
ENGINE_ENTRIES = ("iter", "rng", "feedback", "stats", "phase", "phase_stats")


def validate_state(state: Dict, config: Dict, feedback: Optional[ErrorFeedback],
                   what: str) -> None:
    """Refuse a front end's state dict (``config`` and the engine's entries, optionally
    ``rank``, ``world_size``, ``plan``, ``calibration``) with a missing, unknown or malformed
    entry, naming it. ``what`` names the state in messages."""
    if not isinstance(state, dict):
        raise TypeError(f"a {what} state dict is a dict, got {type(state).__name__}")
    required = ("config",) + ENGINE_ENTRIES
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
    if state["phase"] not in PHASES:
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
    if set(state["phase_stats"]) - set(PHASES):
        raise ValueError(f"checkpoint entry 'phase_stats' has unknown phases "
                         f"{sorted(set(state['phase_stats']) - set(PHASES))}")
