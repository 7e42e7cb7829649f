"""How each gradient group of a step is reduced: the fixed and the calibrated policy.

A front end asks its policy at every step's first group (:meth:`begin_step`, on the thread
that issues the step, while nothing of it is in flight) and for every group
(:meth:`~CalibratedPolicy.choose`). How a candidate is run on a group is the front end's
callable, handed to :meth:`CalibratedPolicy.calibrate`: the policy knows the timing machinery
of :mod:`commpress.comm.calibration` and codecs, never a framework.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..codecs import Codec
from ..comm.calibration import (CALIBRATED, FIXED, FP32, POLICIES, Candidate, CudaTimer, DriftMonitor, Plan,
                                PlanEntry, Trials, candidates, decide, finalists, measure)
from ..comm.transport import Transport
from ..stats import CommStats

logger = logging.getLogger("commpress")


class _Policy:
    """What both policies do alike."""

    plan: Optional[Plan] = None

    def run_group(self, ticket, numel: int, calibrate: Callable[[], None],
                  run: Callable[[Candidate], None], uncompressed: Candidate = FP32,
                  cuda_timed: bool = False) -> None:
        """The policy's part of one group's reduction (``ticket``: the engine's
        :class:`~.reduction.Ticket`), for every front end: on a calibration step
        ``calibrate()`` and ``run(uncompressed)``, else ``run`` the plan's choice for
        ``numel`` values, timed for drift once a plan is adopted (``cuda_timed``: by CUDA
        events, where the host only queues the work)."""
        if ticket.calibrating:
            calibrate()
            choice = uncompressed
        else:
            choice = self.choose(numel, ticket.compress, ticket.plan)
        adopted = ticket.plan is not None and ticket.plan is self.plan  # not on trial
        drift = self.drift if adopted else None
        timer = CudaTimer() if adopted and cuda_timed else None
        start = time.perf_counter()
        run(choice)
        if drift is not None:
            _record(drift, timer, start, ticket.last)


class FixedPolicy(_Policy):
    """The configured codec and collective on every group once compression has started,
    whatever it costs (studies, exact reproductions of a method). Never times anything."""

    name = FIXED
    pinned = False
    calibrating = False
    step_plan: Optional[Plan] = None
    step_timer = None

    def __init__(self, collective: str):
        self._codec_choice = Candidate("codec", collective)

    def begin_step(self, step: int, compress: bool, control: Transport, device: torch.device,
                   inline: bool) -> None:
        pass

    def choose(self, numel: int, compress: bool, plan: Optional[Plan]) -> Candidate:
        return self._codec_choice if compress else FP32

    def state_dict(self) -> Dict:
        return {"plan": None, "calibration": None}

    def load_state_dict(self, plan: Optional[Dict], trials: Optional[Dict]) -> None:
        """Refuses a checkpoint holding a plan or trial progress: this policy makes none."""
        for entry, value in (("plan", plan), ("calibration", trials)):
            if value is not None:
                raise ValueError(f"checkpoint entry {entry!r} is malformed: the fixed policy "
                                 "keeps no plan")


class CalibratedPolicy(_Policy):
    """Compress only where it pays, as measured (see :mod:`commpress.comm.calibration`).

    The first plan is measured in step ``max(start_iter - 1, 1)`` (after DDP's bucket
    rebuild): every candidate timed on every group, the close plans then taking turns over
    real steps, one adopted on every rank. Every ``recalibrate_every`` steps after it, ranks
    vote on whether any saw the reduction time drift, and measure again if one did. A pinned
    ``plan`` is never measured. A front end that reports plans compares :attr:`plan` before
    and after :meth:`begin_step` and :meth:`calibration_done`, the two places one is adopted."""

    name = CALIBRATED

    def __init__(self, codec: Codec, collective: str, start_iter: int, recalibrate_every: int,
                 plan: Optional[Plan] = None,
                 options: Optional[Callable[[int, bool], List[Candidate]]] = None):
        self.codec, self.collective = codec, collective
        #: the candidates on a world of (size, several nodes of several ranks): the DDP
        #: hook's all-reduces and collectives by default, another front end's own
        self.options = options or (lambda world, hierarchical: candidates(codec, collective, world,
                                                                          hierarchical))
        self.start_iter, self.recalibrate_every = start_iter, recalibrate_every
        self.plan = plan
        self.pinned = plan is not None
        self.pending: Optional[Plan] = None   # filled during a calibration step
        self.trials: Optional[Trials] = None  # finalist plans taking turns over steps
        # this step's decisions, read by the front end when it issues the step's groups
        self.calibrating = False
        self.step_plan: Optional[Plan] = None
        self.step_timer: Optional[CudaTimer] = None
        self.step_started = (-1, 0.0)         # (step, perf_counter) of its first group
        self.drift = DriftMonitor()

    def candidates(self, world_size: int, hierarchical: bool) -> List[Candidate]:
        return self.options(world_size, hierarchical)

    def all_candidates(self) -> List[Candidate]:
        """Every choice this configuration could make, on any world (to check a plan)."""
        return self.options(3, True)

    # -- a step -----------------------------------------------------------------------------
    def begin_step(self, step: int, compress: bool, control: Transport, device: torch.device,
                   inline: bool) -> None:
        """Time the previous trial step (first group to first group: its whole iteration),
        adopt a plan when the trials are over, decide whether this step calibrates and which
        plan it runs. ``inline``: the front end issues the groups on the device's stream (NCCL),
        so an adopted plan is timed by CUDA events."""
        cuda = device.type == "cuda"
        if cuda and self.trials is not None:
            # trial steps are timed on the host clock, which on a GPU runs ahead of the work
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        trials = self.trials
        if trials is not None:
            started_step, started_at = self.step_started
            if trials.covers(step - 1) and started_step == step - 1:  # timed in this process
                trials.record(step - 1, now - started_at)
            if step > trials.last:
                self.trials = None
                self.adopt(trials.decide(control, self.codec))
        self.calibrating = self.trials is None and self._calibration_due(step, compress, control)
        if self.calibrating:
            self.pending = Plan(step)
        in_trial = self.trials is not None and self.trials.covers(step)
        self.step_plan = self.trials.plan_for(step) if in_trial else self.plan
        self.step_started = (step, now)
        self.step_timer = (CudaTimer() if cuda and inline and self.step_plan is not None
                           and self.step_plan is self.plan else None)

    def _calibration_due(self, step: int, compress: bool, control: Transport) -> bool:
        """The first plan: in step ``max(start_iter - 1, 1)`` (groups are reduced in fp32
        until it exists). Later: at every ``recalibrate_every``-th step after the plan's, if
        any rank saw the reduction time drift (one small all-gather, at a step every rank
        knows)."""
        if self.pinned:
            return False
        if self.plan is None:
            return step >= max(self.start_iter - 1, 1)
        if (not compress or not self.recalibrate_every or step <= self.plan.step
                or (step - self.plan.step) % self.recalibrate_every):
            return False
        votes = control.all_gather(torch.tensor([self.drift.drifted()], dtype=torch.uint8,
                                                device=control.device))
        return bool(votes.any())

    def choose(self, numel: int, compress: bool, plan: Optional[Plan]) -> Candidate:
        """A group of ``numel`` elements under the step's ``plan`` (fp32 before the first)."""
        if not compress or plan is None:
            return FP32
        return plan.entry_for(numel).choice

    # -- measuring ------------------------------------------------------------------------
    def calibrate(self, numel: int, options: Sequence[Candidate],
                  run: Callable[[Candidate], Callable[[], None]], control: Transport,
                  device: torch.device, prepare: Callable[[], None], scale: float = 1.0) -> None:
        """Time ``run(choice)`` for every option on a group of ``numel`` elements (``scale``:
        how many times the timed sample the group is) and add the decision to the pending
        plan. Collective over ``control``: every rank calibrates the same groups in order."""
        if len(options) > 1:
            seconds = [s * scale for s in measure([run(c) for c in options], control, device,
                                                  prepare=prepare)]
            timed = {c.label(self.codec): s for c, s in zip(options, seconds)}
            self.pending.add(PlanEntry(numel, decide(options, seconds), timed))
        else:  # nothing to compare (an fp32 "codec")
            self.pending.add(PlanEntry(numel, options[0], {}))

    def calibration_done(self, options: Sequence[Candidate]) -> None:
        """After a calibration step's last group: adopt the per-group plan at once if no other
        plan comes near it, else start the trial steps."""
        isolated, self.pending = self.pending, None
        plans = finalists(isolated, options, self.codec)
        if len(plans) == 1:
            self.adopt(plans[0])
        else:
            self.trials = Trials(plans, isolated.step + 1)

    def adopt(self, plan: Plan) -> None:
        self.plan = plan
        self.drift.reset()

    def timed_step(self, done: torch.futures.Future) -> torch.futures.Future:
        """``done`` (the future of an adopted plan's last all-reduce of a step), recording the
        step's reduction time for drift when it completes. The callback holds the monitor and
        timer only, never a front end's state (see :meth:`Runtime.all_reduce_mean`)."""
        started, drift, timer = self.step_started[1], self.drift, self.step_timer

        def watch(reduced: torch.futures.Future) -> torch.Tensor:
            mean = reduced.value()
            _record(drift, timer, started, step_done=True)  # on the GPU: after the all-reduce
            return mean
        return done.then(watch)

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"plan": self.plan.state_dict() if self.plan else None,
                "calibration": self.trials.state_dict() if self.trials else None}

    def load_state_dict(self, plan: Optional[Dict], trials: Optional[Dict]) -> None:
        """A checkpoint's plan and trial progress (a pinned plan stays unless it holds one)."""
        if plan or not self.pinned:
            self.plan = Plan.from_state_dict(plan, self.all_candidates()) if plan else None
        self.trials = Trials.from_state_dict(trials, self.all_candidates()) if trials else None
        self.pending = None
        self.drift.reset()


def _record(drift: DriftMonitor, timer: Optional[CudaTimer], started: float,
            step_done: bool) -> None:
    """Add a reduction's time to ``drift``: the CUDA events' where the host only queued the
    work (``timer``), else the host clock's since ``started``."""
    if timer is not None:
        drift.add_timer(timer.stop(), step_done)
    else:
        drift.add(time.perf_counter() - started, step_done)


def make_policy(name: str, codec: Codec, collective: str, start_iter: int,
                recalibrate_every: int, plan=None, options=None):
    """The policy object ``name`` configures (``plan``: pinned, see :func:`given_plan`;
    ``options``: the front end's candidates, see :class:`CalibratedPolicy`)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
    if name == FIXED:
        if plan is not None:
            raise ValueError(f"plan= pins the calibrated policy's choices; policy={name!r} "
                             "has none (leave plan=None, or use policy='calibrated')")
        return FixedPolicy(collective)
    policy = CalibratedPolicy(codec, collective, start_iter, recalibrate_every, options=options)
    if plan is not None:
        policy.plan, policy.pinned = given_plan(plan, policy.all_candidates()), True
    return policy


def given_plan(plan, allowed: Sequence[Candidate]) -> Plan:
    """A pinned plan: a :class:`Plan`, its state dict, a whole state dict holding one, or the
    path of a JSON file of either."""
    source = "plan"
    if isinstance(plan, (str, os.PathLike)):
        source = f"plan file {os.fspath(plan)!r}"
        with open(plan) as f:
            try:
                plan = json.load(f)
            except ValueError as exc:
                raise ValueError(f"commpress: {source} is not JSON ({exc})") from None
    if isinstance(plan, Plan):
        plan = plan.state_dict()
    if isinstance(plan, dict) and "entries" not in plan and "plan" in plan:  # a whole state dict
        plan = plan["plan"]
    if not isinstance(plan, dict) or not plan.get("entries"):
        raise ValueError(f"commpress: {source} holds no plan (expected state.plan.state_dict(), "
                         f"a state_dict() with a plan, or a file written by save_plan); a run "
                         f"adopts its plan after the trial steps")
    try:
        return Plan.from_state_dict(plan, allowed)
    except ValueError as exc:
        raise ValueError(f"commpress: {source} does not fit this configuration: {exc}") from None



def report_plan(stats: CommStats, plan: Optional[Plan], codec: Codec,
                error_feedback: Optional[str], rank: Optional[int] = None) -> None:
    """Put ``plan`` in words into ``stats.plan``, with a note when error feedback is idle
    because no group goes through the codec. ``rank`` 0 (a plan just adopted): also log them."""
    idle = ""
    if plan is not None and error_feedback and all(e.choice.codec != "codec"
                                                   for e in plan.entries.values()):
        idle = (f"error feedback ({error_feedback}) idle: the plan sends no group through "
                f"{codec.name} (feedback corrects that codec's error only)")
    stats.plan = "" if plan is None else plan.summary(codec) + (f"; {idle}" if idle else "")
    if rank == 0:
        logger.info("commpress calibrated %s", stats.plan)
        if idle:
            logger.warning("commpress: %s", idle)
