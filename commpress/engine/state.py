"""What every front end's state offers a user over its :class:`~.reduction.ReductionEngine`:
the configuration, the statistics, the calibrated plan, and a checkpoint of this rank."""
from __future__ import annotations

import json
import logging
from typing import Dict, Optional

from ..codecs import Codec
from ..comm.calibration import CALIBRATED, Plan
from ..config import CompressionConfig, check_counts
from .policy import make_policy
from .reduction import ReductionEngine, validate_state
from .runtime import Runtime

logger = logging.getLogger("commpress")


class EngineState:
    """The front-end-independent part of a compression state (the DDP hook's
    :class:`~commpress.CompressionState`, the Horovod optimizer's ``compression``, the MPI
    :class:`~commpress.mpi.GradientReducer`): the settings, checked alike for every front end
    (see :class:`~commpress.CompressionState` for their meaning; ``options``: the front end's
    candidates for the calibrated policy), and the engine built from them. Subclasses give :attr:`_runtime`
    (None until they communicate) and may add their settings to :meth:`_config`."""

    def __init__(self, codec: Codec, collective: str = "auto",
                 error_feedback: Optional[str] = None, server_feedback: bool = False,
                 seed: int = 0, policy: str = CALIBRATED, start_iter: int = 0,
                 min_numel: int = 1024, recalibrate_every: int = 1000, plan=None,
                 unit: str = "group", log_every: int = 0, options=None):
        self.config = CompressionConfig(codec, collective, error_feedback, server_feedback, seed)
        check_counts(recalibrate_every=recalibrate_every, start_iter=start_iter,
                     min_numel=min_numel, log_every=log_every)
        self.policy, self.start_iter, self.min_numel = policy, start_iter, min_numel
        self.recalibrate_every = recalibrate_every
        self.engine = ReductionEngine(self.config, make_policy(
            policy, codec, collective, start_iter, recalibrate_every, plan, options), unit,
            log_every)
        self._loaded_from: Optional[tuple] = None  # (rank, world size) of a loaded checkpoint

    # what the engine holds, under the names users and ACDC read
    stats = property(lambda self: self.engine.stats)
    feedback = property(lambda self: self.engine.feedback)
    phase_stats = property(lambda self: self.engine.phase_stats)
    mask = property(lambda self: self.engine.mask)
    _policy = property(lambda self: self.engine.policy)

    # the shared configuration, read-only
    codec = property(lambda self: self.config.codec)
    collective = property(lambda self: self.config.collective)
    error_feedback = property(lambda self: self.config.error_feedback)
    server_feedback = property(lambda self: self.config.server_feedback)
    seed = property(lambda self: self.config.seed)

    @property
    def _runtime(self) -> Optional[Runtime]:
        return None

    @property
    def iter(self) -> int:
        """Steps reduced so far (restored by :meth:`load_state_dict`)."""
        return self.engine.iter

    @property
    def phase(self) -> str:
        """AC/DC phase (``"dense"`` or ``"sparse"``), set by :class:`commpress.ACDC`."""
        return self.engine.phase

    @phase.setter
    def phase(self, value: str) -> None:
        self.engine.phase = value

    @property
    def plan(self) -> Optional[Plan]:
        """The calibrated policy's choice per group size (None until calibrated, and under
        ``policy="fixed"``)."""
        return self.engine.plan

    def save_plan(self, path) -> None:
        """Write :attr:`plan` as JSON, for ``plan=path`` in later runs."""
        if self.plan is None:
            raise RuntimeError("commpress: no plan yet (the calibrated policy adopts one after "
                               "its trial steps; policy='fixed' has none)")
        with open(path, "w") as f:
            json.dump(self.plan.state_dict(), f, indent=1)

    # -- persistence ----------------------------------------------------------------------
    def _config(self) -> Dict:
        """What a checkpoint must have been made with."""
        return {**self.config.describe(), "policy": self.policy, "start_iter": self.start_iter,
                "min_numel": self.min_numel}

    def _agreement_fields(self) -> Dict:
        """What every rank must have alike before the first reduction: the shared
        configuration, the front end's settings, the step, the phase and the plan."""
        described = self.config.describe()
        settings = {k: v for k, v in self._config().items() if k not in described}
        return {**self.config.shared(), **settings, "iter": self.iter, "phase": self.phase,
                "recalibrate_every": getattr(self._policy, "recalibrate_every", 0),
                "plan": self.plan.state_dict() if self.plan else None}

    def state_dict(self) -> Dict:
        """This rank's: the step, its random generators and error-feedback memories, the
        statistics, the plan and trial progress, and the configuration they belong to."""
        origin = ((self._runtime.transport.rank, self._runtime.transport.world_size)
                  if self._runtime is not None else self._loaded_from)
        return {"config": self._config(), **self.engine.state_dict(),
                "rank": origin[0] if origin else None,
                "world_size": origin[1] if origin else None}

    def load_state_dict(self, state: Dict) -> None:
        """Restore :meth:`state_dict`, after checking every entry (a wrong one is refused with
        its name). A checkpoint saved by another rank (the habit of saving on rank 0 and
        loading everywhere) is accepted with a warning: this rank's random generator is
        re-derived from (seed, rank, step) so rounding noise stays independent across ranks,
        and the per-rank memories are reset consistently (see
        :meth:`ErrorFeedback.adopt_other_rank`)."""
        validate_state(state, self._config(), self.feedback, type(self).__name__)
        self.engine.load_state_dict(state)
        rank, world = state.get("rank"), state.get("world_size")
        self._loaded_from = (rank, world) if rank is not None else None
        self._check_loaded_rank()

    def _check_loaded_rank(self) -> None:
        """Once the rank is known (at load, or when the runtime starts)."""
        if self._loaded_from is None or self._runtime is None:
            return
        transport = self._runtime.transport
        if self._loaded_from != (transport.rank, transport.world_size):
            logger.warning("commpress: loaded a checkpoint of rank %d of %d on rank %d of %d: "
                           "re-deriving this rank's random generator from (seed, rank, step) and "
                           "resetting per-rank error-feedback memories. Save one checkpoint per "
                           "rank to resume exactly.", *self._loaded_from, transport.rank,
                           transport.world_size)
            self.engine.adopt_other_rank()
        self._loaded_from = None
