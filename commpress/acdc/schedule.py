"""When AC/DC training is sparse: a list of sparse intervals over optimizer steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

# AC/DC paper preset (ResNet-50, 100 epochs), as fractions of the run: prune at 10, 20, ...,
# 70 and 85; restore at 15, 25, ..., 75; the run ends sparse.
#: re-prunes in the first sparse phase's ramp (``ACDCSchedule.ramp_steps``)
RAMP_STAGES = 10
_PAPER = [(0.05 * k, 0.05 * k + 0.05) for k in range(2, 15, 2)] + [(0.85, 1.0)]


@dataclass(frozen=True)
class ACDCSchedule:
    """Sparse phases as half-open ``(start, stop)`` intervals of optimizer steps, within
    ``total`` steps; every other step is dense. A sparse phase starts by pruning to the
    target sparsity at once and ends by restoring the pruned weights as zeros.

    ``ramp_steps``: instead, the first sparse phase raises the sparsity to the target over its
    first ``ramp_steps`` steps, in ``RAMP_STAGES`` re-prunes along Zhu and Gupta's (2017) cubic
    curve (the fraction of the target ``1 - (1 - k / RAMP_STAGES)^3`` at stage ``k``), so the
    first prune does not cut 90% of a model that has not yet learned which weights matter in
    one step. Later prunes follow a dense phase whose weights grew back under the same masks,
    and prune at once.

    Example::

        >>> ACDCSchedule.paper(100).sparse          # epochs as steps
        [(10, 15), (20, 25), ..., (70, 75), (85, 100)]
        >>> ACDCSchedule.paper(100, steps_per_epoch=390)   # the same, in steps
    """

    sparse: List[Tuple[int, int]]
    total: int
    steps_per_unit: int = field(default=1, compare=False)
    ramp_steps: int = 0

    def __post_init__(self):
        if not isinstance(self.total, int) or isinstance(self.total, bool) or self.total <= 0:
            raise ValueError(f"schedule total must be a positive number of steps, got {self.total!r}")
        if (not isinstance(self.steps_per_unit, int) or isinstance(self.steps_per_unit, bool)
                or self.steps_per_unit <= 0):
            raise ValueError(f"steps_per_unit must be a positive integer, got {self.steps_per_unit!r}")
        previous = 0
        for phase in self.sparse:
            if not (isinstance(phase, (tuple, list)) and len(phase) == 2):
                raise ValueError(f"sparse phases are (start, stop) pairs of steps, got {phase!r}")
            start, stop = phase
            if not all(isinstance(b, int) and not isinstance(b, bool) for b in (start, stop)):
                raise ValueError(f"sparse phase ({start}, {stop}) must have integer bounds")
            if stop <= start:
                raise ValueError(f"sparse phase ({start}, {stop}) has a non-positive length")
            if start < previous:
                raise ValueError(f"sparse phase ({start}, {stop}) overlaps or precedes the previous "
                                 f"one (phases must be sorted and disjoint)")
            if start < 0 or stop > self.total:
                raise ValueError(f"sparse phase ({start}, {stop}) lies outside [0, {self.total}]")
            previous = stop
        if (not isinstance(self.ramp_steps, int) or isinstance(self.ramp_steps, bool)
                or self.ramp_steps < 0):
            raise ValueError(f"ramp_steps must be a non-negative integer, got {self.ramp_steps!r}")
        if self.ramp_steps:
            if not self.sparse:
                raise ValueError("ramp_steps needs a sparse phase to ramp")
            start, stop = self.sparse[0]
            if self.ramp_steps > stop - start:
                raise ValueError(f"ramp_steps ({self.ramp_steps}) must fit in the first sparse "
                                 f"phase ({start}, {stop}): {stop - start} steps")

    @classmethod
    def paper(cls, total_units: int, steps_per_epoch: int = 1, last_dense: float = 0.10,
              ramp_steps: int = 0) -> "ACDCSchedule":
        """The paper's shape scaled to ``total_units`` epochs: 10% dense warm-up, sparse and
        dense phases of 5% alternating up to 75%, dense to 85%, sparse to the end.

        ``last_dense``: at least this fraction of the run is dense before the final sparse
        phase (the paper's 0.10); a longer one drops the alternations that would end inside
        it. The dense member (weights at the end of that phase) recovers from the last
        sparse phase for that long: in short runs 10% is too little for it to catch up with
        dense training.

        ``ramp_steps``: the first sparse phase's ramp, in steps (see the class docstring).

        Boundaries are rounded to whole epochs. In short runs, where 5% is under one epoch,
        every phase still lasts at least one epoch and is followed by at least one dense
        epoch, so phases stay distinct (they are pushed later); the alternations that no longer
        fit before the final sparse phase are dropped, and the run always ends with that final
        sparse fine-tuning (from 85% of the run, or its last epoch). At least 2 epochs."""
        if not isinstance(total_units, int) or total_units < 2:
            raise ValueError(f"the paper schedule needs at least 2 epochs (a dense one and the "
                             f"final sparse one), got {total_units!r}")
        if not 0.10 <= last_dense <= _PAPER[-1][0] - _PAPER[0][0]:
            raise ValueError(f"last_dense must be between 0.10 (the paper's) and 0.75 of the "
                             f"run, got {last_dense!r}")
        final_start = min(max(round(_PAPER[-1][0] * total_units), 1), total_units - 1)
        sparse, previous = [], 0  # previous: where the last sparse phase ended
        for a, b in _PAPER[:-1]:
            if b > _PAPER[-1][0] - last_dense + 1e-9:  # would end inside the last dense phase
                break
            start = max(round(a * total_units), previous + 1)  # a dense epoch before each
            stop = max(round(b * total_units), start + 1)
            if stop >= final_start:  # and one before the final phase
                break
            sparse.append((start, stop))
            previous = stop
        sparse.append((final_start, total_units))
        return cls([(a * steps_per_epoch, b * steps_per_epoch) for a, b in sparse],
                   total_units * steps_per_epoch, steps_per_epoch, ramp_steps)

    @classmethod
    def alternating(cls, total: int, warmup: int, sparse_len: int, dense_len: int,
                    final_sparse: int = 0, final_dense: int = 0) -> "ACDCSchedule":
        """Warm-up, then sparse/dense phases alternating, then optionally a dense and a final
        sparse phase ending at ``total``."""
        if min(warmup, sparse_len, dense_len, final_sparse, final_dense) < 0 or sparse_len == 0:
            raise ValueError("phase lengths must be non-negative and sparse_len positive")
        end_alternating = total - final_sparse - final_dense
        sparse, start = [], warmup
        while start + sparse_len <= end_alternating:
            sparse.append((start, start + sparse_len))
            start += sparse_len + dense_len
        if final_sparse:
            sparse.append((total - final_sparse, total))
        return cls(sparse, total)

    def phase_at(self, step: int) -> str:
        """``"sparse"`` or ``"dense"`` for the step about to run (``step`` steps done). At and
        past ``total`` the last phase holds, so a run ending sparse keeps its sparse member."""
        step = min(step, self.total - 1)
        return "sparse" if any(a <= step < b for a, b in self.sparse) else "dense"

    def sparsity_fraction(self, step: int) -> float:
        """The fraction of the target sparsity for the step about to run (``step`` steps
        done) in a sparse phase: 1 but in the first phase's ramp (see ``ramp_steps``)."""
        if not self.ramp_steps:
            return 1.0
        into = min(step, self.total - 1) - self.sparse[0][0]
        if not 0 <= into < self.ramp_steps:
            return 1.0
        stage = into * RAMP_STAGES // self.ramp_steps + 1
        return 1.0 - (1.0 - stage / RAMP_STAGES) ** 3

    @property
    def prune_steps(self) -> List[int]:
        return [a for a, _ in self.sparse]

    @property
    def restore_steps(self) -> List[int]:
        return [b for _, b in self.sparse if b < self.total]
