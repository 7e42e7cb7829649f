"""A measured choice of codec and collective per bucket: compress only where it pays.

Whether compression saves time depends on the link and on how fast the codec runs next to
the backward pass, which no byte count predicts: on a 10 Gbit/s link a plain fp32 all-reduce
beats a CPU codec. So the calibrated policy times the candidates on the real buckets, over the
real group, once (during a warm-up step) and again when the step's communication time drifts.

- :func:`candidates`: what is tried, most exact first: the fp32 all-reduce, an fp16 all-reduce,
  then the configured codec under each collective that applies.
- :func:`measure`: every candidate run :data:`RUNS` times, each run started together on every
  rank (a one-element all-gather); a candidate's time is its fastest run on its slowest rank,
  so every rank holds the same numbers (one all-gather of the timings). Front ends time a
  bucket larger than :data:`SAMPLE_NUMEL` on a sample of that size and scale.
- :func:`decide`: the most exact candidate within :data:`MARGIN` of the fastest. fp32 thus wins
  every near tie, and the choice is never slower than fp32 by more than the timing noise.
- :class:`Trials`: timing a reduction alone misses what it costs next to the backward pass
  (casts and codecs take the CPU or GPU from it; an all-reduce overlaps it). So the plans
  whose isolated time is within :data:`TRIAL_FACTOR` of the fastest (one fp32 and one fp16
  all-reduce plan, and the per-bucket plan :func:`decide` made) then each run
  :data:`TRIAL_STEPS` real training steps, interleaved, and the one with the shortest median
  iteration (on the slowest rank) is adopted, fp32 first within :data:`MARGIN`.
- :class:`Plan`: the choices by bucket size, identical on every rank (decided from identical
  numbers), part of the front end's checkpoint, so a resumed run reduces as the original did.
- :class:`DriftMonitor`: the reduction time per step against the first steps after the plan
  (on CUDA read from events, :class:`CudaTimer`); a plan is stale when it moved by more than
  :data:`DRIFT` either way (a congested or freed link), which the front end then agrees on
  across ranks before calibrating again.

The module knows transports and codecs only; what a candidate run does is the front end's
callable.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..codecs import Codec
from .transport import Transport

#: the front ends' policies: measure and choose per bucket, or apply the codec everywhere
CALIBRATED, FIXED = "calibrated", "fixed"
POLICIES = (CALIBRATED, FIXED)
#: a less exact candidate is chosen only if it beats every more exact one by this fraction
MARGIN = 0.05
#: timed runs per candidate: the first may pay allocations and kernel compilation
RUNS = 3
#: buckets larger than this many elements are timed on their first ``SAMPLE_NUMEL`` values,
#: each candidate's time scaled by the size ratio: every candidate is pipelined in pieces of
#: 1M elements or less, so by 4M its time grows linearly, and the calibration step of a
#: 100M-element bucket then costs about what one step does, in time and in memory
SAMPLE_NUMEL = 1 << 22
#: a plan is stale when the step's reduction time changed by this factor (either way)
DRIFT = 2.0
#: steps whose reduction times make the reference, and the window compared with it
WINDOW = 10
#: real training steps each finalist plan runs (interleaved) before one is adopted
TRIAL_STEPS = 5
#: a plan is a finalist if its isolated time is within this factor of the fastest plan's
TRIAL_FACTOR = 2.0


@dataclass(frozen=True)
class Candidate:
    """``codec``: ``"fp32"``, ``"fp16"`` or ``"codec"`` (the configured one); ``collective``:
    one of :data:`commpress.comm.ALGORITHMS`."""

    codec: str
    collective: str

    def label(self, codec: Codec) -> str:
        name = self.codec
        if self.codec == "codec":  # "qsgd4" rather than "qsgd"
            name = codec.short_name
        return name if self.collective == "allreduce" else f"{name}/{self.collective}"


FP32 = Candidate("fp32", "allreduce")


def candidates(codec: Codec, collective: str, world_size: int, hierarchical: bool) -> List[Candidate]:
    """What to time, most exact first. ``collective``: the configured one (``"auto"``: every
    collective that applies: ``allgather``, ``reduce_scatter`` beyond 2 ranks, where it sends
    fewer bytes, and ``hierarchical`` when ``hierarchical`` is true, i.e. several nodes of
    several ranks)."""
    if codec.summable:  # fp32, fp16 or bf16 itself: its all-reduce against fp32's
        return [FP32] if codec.wire_dtype == torch.float32 else [FP32, Candidate("codec", "allreduce")]
    if collective != "auto":
        collectives = [collective]
    else:
        collectives = (["allgather"] + (["reduce_scatter"] if world_size > 2 else [])
                       + (["hierarchical"] if hierarchical else []))
    return [FP32, Candidate("fp16", "allreduce")] + [Candidate("codec", c) for c in collectives]


def decide(options: Sequence, seconds: Sequence[float]):
    """The first (most exact) of ``options`` within :data:`MARGIN` of the fastest."""
    fastest = min(seconds)
    return next(c for c, s in zip(options, seconds) if s <= fastest * (1 + MARGIN))


def measure(runs: Sequence[Callable[[], None]], control: Transport,
            device: torch.device = torch.device("cpu"),
            prepare: Optional[Callable[[], None]] = None) -> List[float]:
    """Seconds of each of ``runs`` (collective calls every rank makes in the same order): its
    fastest of :data:`RUNS` runs, on the slowest rank, the same list on every rank.
    ``prepare`` runs before each run, untimed (e.g. restoring the input a run consumes); runs
    on ``device`` (CUDA) are synchronized before their clock stops."""
    where = getattr(control, "device", None)  # the transport's own tensors (CPU: gloo)
    mine = []
    for run in runs:
        best = math.inf
        for _ in range(RUNS):
            if prepare is not None:
                prepare()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            control.all_gather(torch.zeros(1, device=where))  # start together
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        mine.append(best)
    every = control.all_gather(torch.tensor(mine, dtype=torch.float64, device=where))
    return every.view(control.world_size, -1).max(dim=0).values.tolist()


@dataclass
class PlanEntry:
    """One bucket size's choice and the timings it was made from (label -> seconds)."""

    numel: int
    choice: Candidate
    seconds: Dict[str, float]


class Plan:
    """Choices by bucket size (elements). A size that was not calibrated (a bucket DDP
    rebuilt differently) takes the choice of the nearest calibrated size, by ratio."""

    def __init__(self, step: int, entries: Optional[Dict[int, PlanEntry]] = None,
                 trials: Optional[Dict[str, float]] = None):
        self.step = step  # the last step of its calibration
        self.entries: Dict[int, PlanEntry] = dict(entries or {})
        #: median iteration seconds of each finalist in the trial steps (label -> seconds)
        self.trials: Dict[str, float] = dict(trials or {})

    def uniform(self, choice: Candidate) -> "Plan":
        """This plan's bucket sizes and timings, with ``choice`` for every one."""
        return Plan(self.step, {n: PlanEntry(n, choice, e.seconds) for n, e in self.entries.items()})

    def choices(self) -> Dict[int, Candidate]:
        return {n: e.choice for n, e in self.entries.items()}

    def isolated_seconds(self, codec: Codec) -> float:
        """The sum of its choices' isolated times (0 where nothing was timed)."""
        return sum(e.seconds.get(e.choice.label(codec), 0.0) for e in self.entries.values())

    def label(self, codec: Codec) -> str:
        labels = sorted({e.choice.label(codec) for e in self.entries.values()})
        return labels[0] if len(labels) == 1 else "per bucket (" + ", ".join(labels) + ")"

    @property
    def all_reduce(self) -> bool:
        """Every choice is an all-reduce (fp32, fp16, or a summable codec): the codec paid
        nowhere, and a front end may reduce as plain data parallelism does."""
        return all(e.choice.collective == "allreduce" for e in self.entries.values())

    def add(self, entry: PlanEntry) -> None:
        self.entries[entry.numel] = entry

    def entry_for(self, numel: int) -> PlanEntry:
        if not self.entries:
            raise LookupError("an empty calibration plan has no choice")
        nearest = min(self.entries, key=lambda n: (abs(math.log(max(n, 1) / max(numel, 1))), n))
        return self.entries[nearest]

    def summary(self, codec: Codec) -> str:
        parts = []
        for numel in sorted(self.entries):
            entry = self.entries[numel]
            timed = (", ".join(f"{label} {1e3 * s:.1f} ms" for label, s in entry.seconds.items())
                     or "the only candidate")
            parts.append(f"{numel * 4 / 1e6:.2f} MB bucket -> {entry.choice.label(codec)} ({timed})")
        trials = ("; trial steps (median): " + ", ".join(
            f"{label} {1e3 * s:.1f} ms" for label, s in self.trials.items())) if self.trials else ""
        return f"plan of step {self.step}: " + "; ".join(parts) + trials

    def state_dict(self) -> Dict:
        return {"step": self.step, "trials": dict(self.trials),
                "entries": [{"numel": e.numel, "codec": e.choice.codec,
                             "collective": e.choice.collective, "seconds": dict(e.seconds)}
                            for e in self.entries.values()]}

    @classmethod
    def from_state_dict(cls, state: Dict, allowed: Sequence[Candidate]) -> "Plan":
        """A plan from :meth:`state_dict`, refusing a malformed one or a choice outside
        ``allowed`` (what this configuration could have chosen), with its name."""
        try:
            step, entries = state["step"], state["entries"]
            plan = cls(int(step), trials={str(k): float(v) for k, v in state.get("trials", {}).items()})
            for e in entries:
                choice = Candidate(str(e["codec"]), str(e["collective"]))
                if choice not in allowed:
                    raise ValueError(f"choice {choice} is not a candidate of this configuration")
                if int(e["numel"]) < 1:
                    raise ValueError(f"a bucket of {e['numel']} elements")
                plan.add(PlanEntry(int(e["numel"]), choice,
                                   {str(k): float(v) for k, v in e["seconds"].items()}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"checkpoint entry 'plan' is malformed ({exc})") from None
        if not plan.entries:
            raise ValueError("checkpoint entry 'plan' is malformed (no bucket has a choice)")
        return plan


def finalists(isolated: Plan, options: Sequence[Candidate], codec: Codec) -> List[Plan]:
    """The plans worth trial steps, most exact first: one uniform plan per uncompressed
    candidate (all-reduces in fp32 or fp16, or a front end's own reduction in full or half
    precision) and ``isolated`` (the per-bucket decision), each only if its isolated time is
    within :data:`TRIAL_FACTOR` of the fastest, without duplicates."""
    plans = [isolated.uniform(c) for c in options
             if c.collective == "allreduce" or c.codec != "codec"] + [isolated]
    fastest = min(p.isolated_seconds(codec) for p in plans)
    out: List[Plan] = []
    for plan in plans:
        if (plan.isolated_seconds(codec) <= fastest * TRIAL_FACTOR
                and all(plan.choices() != p.choices() for p in out)):
            out.append(plan)
    return out


class Trials:
    """Finalist plans taking turns over real steps from ``first`` on (plan ``i`` in steps
    ``first + i``, ``first + i + n``, ...), with the iteration time of each step."""

    def __init__(self, plans: Sequence[Plan], first: int):
        self.plans, self.first = list(plans), first
        self.seconds: List[List[float]] = [[] for _ in self.plans]

    @property
    def last(self) -> int:
        return self.first + TRIAL_STEPS * len(self.plans) - 1

    def covers(self, step: int) -> bool:
        return self.first <= step <= self.last

    def plan_for(self, step: int) -> Plan:
        return self.plans[(step - self.first) % len(self.plans)]

    def record(self, step: int, seconds: float) -> None:
        self.seconds[(step - self.first) % len(self.plans)].append(seconds)

    def state_dict(self) -> Dict:
        return {"first": self.first, "plans": [p.state_dict() for p in self.plans],
                "seconds": [list(s) for s in self.seconds]}

    @classmethod
    def from_state_dict(cls, state: Dict, allowed: Sequence[Candidate]) -> "Trials":
        """Trials from :meth:`state_dict` (a checkpoint saved between trial steps), refusing a
        malformed one with its name, as :meth:`Plan.from_state_dict` does."""
        try:
            trials = cls([Plan.from_state_dict(p, allowed) for p in state["plans"]], int(state["first"]))
            seconds = [[float(x) for x in s] for s in state["seconds"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint entry 'calibration' is malformed ({exc})") from None
        if not trials.plans or len(seconds) != len(trials.plans):
            raise ValueError("checkpoint entry 'calibration' is malformed (one list of step "
                             "times per trial plan expected)")
        trials.seconds = seconds
        return trials

    def decide(self, control: Transport, codec: Codec) -> Plan:
        """The adopted plan, the same on every rank: the medians of each finalist's steps,
        each the slowest rank's, given to :func:`decide` (a collective on ``control``)."""
        mine = torch.tensor([statistics.median(s) if s else math.inf for s in self.seconds],
                            dtype=torch.float64,
                            device=getattr(control, "device", None))
        medians = control.all_gather(mine).view(control.world_size, -1).max(dim=0).values.tolist()
        chosen = decide(self.plans, medians)
        return Plan(self.last, chosen.entries,
                    {p.label(codec): s for p, s in zip(self.plans, medians)})


class CudaTimer:
    """Seconds of the work queued on the current CUDA stream between construction and
    :meth:`stop`, read from events once the GPU has done it: the host only launches that
    work, so its clock would count the launches."""

    def __init__(self):
        self._begin = torch.cuda.Event(enable_timing=True)
        self._begin.record()
        self._end: Optional[torch.cuda.Event] = None

    def stop(self) -> "CudaTimer":
        self._end = torch.cuda.Event(enable_timing=True)
        self._end.record()
        return self

    def done(self) -> bool:
        return self._end.query()

    def seconds(self) -> float:
        self._end.synchronize()
        return self._begin.elapsed_time(self._end) / 1e3


#: timers a :class:`DriftMonitor` leaves unread before it waits for the oldest
MAX_UNREAD = 64


class DriftMonitor:
    """Reduction seconds per step: the median of the first :data:`WINDOW` steps after a plan is
    the reference, the median of the latest :data:`WINDOW` is compared with it."""

    def __init__(self):
        self.reference: Optional[float] = None
        self._first: List[float] = []
        self._recent: deque = deque(maxlen=WINDOW)
        self._current = 0.0
        self._unread: deque = deque()  # (timer, step_done) of work the GPU may not have done

    def reset(self) -> None:
        self.__init__()

    def add(self, seconds: float, step_done: bool) -> None:
        self._current += seconds
        if not step_done:
            return
        total, self._current = self._current, 0.0
        if self.reference is None:
            self._first.append(total)
            if len(self._first) == WINDOW:
                self.reference = statistics.median(self._first)
        else:
            self._recent.append(total)

    def add_timer(self, timer: CudaTimer, step_done: bool) -> None:
        """:meth:`add` for work timed on the GPU (a stopped :class:`CudaTimer`): read in order,
        as the GPU finishes, so that reading rarely waits."""
        self._unread.append((timer, step_done))
        while self._unread and (self._unread[0][0].done() or len(self._unread) > MAX_UNREAD):
            timer, done = self._unread.popleft()
            self.add(timer.seconds(), done)

    def drifted(self) -> bool:
        if self.reference is None or len(self._recent) < WINDOW or self.reference <= 0:
            return False
        ratio = statistics.median(self._recent) / self.reference
        return ratio > DRIFT or ratio < 1 / DRIFT
