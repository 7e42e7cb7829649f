"""What every front end is configured with, checked in one place.

:class:`CompressionConfig` is immutable and validated when built: the DDP hook's
:class:`~commpress.CompressionState`, the MPI functions and the Horovod optimizer all build one,
so a bad codec, collective or feedback kind fails the same way, at construction, whichever
front end a user picked; and its :meth:`~CompressionConfig.describe` is what ranks compare
(:func:`commpress.comm.agreement.agree`) and what checkpoints record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from .codecs import Codec
from .codecs.wire import FORMAT_VERSION

#: the compressed collectives (see :mod:`commpress.comm.collectives`)
ALGORITHMS = ("allgather", "reduce_scatter", "allreduce", "hierarchical")
#: the error-feedback kinds (see :mod:`commpress.feedback`)
FEEDBACK_KINDS = ("ef", "ef21")


def check_counts(**values) -> None:
    """Refuse a front end's count setting (``start_iter``, ``min_numel``, ...) that is not a
    non-negative integer, naming it."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class CompressionConfig:
    """Args:
        codec: the :class:`~commpress.Codec` applied to the compressed tensors.
        collective: ``"auto"`` or one of :data:`commpress.comm.ALGORITHMS`.
        error_feedback: None, ``"ef"`` or ``"ef21"`` (see :mod:`commpress.feedback`).
        server_feedback: with ``"ef"``, also keep the residual of ``reduce_scatter``'s second
            quantization (``"ef21"`` always keeps it).
        seed: stochastic rounding on rank ``r`` is seeded from ``(seed, r)``.

    Example::

        >>> CompressionConfig(QSGD(bits=4), collective="reduce_scatter", error_feedback="ef")
    """

    codec: Codec
    collective: str = "auto"
    error_feedback: Optional[str] = None
    server_feedback: bool = False
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.codec, Codec):
            raise TypeError(f"codec must be a commpress Codec, got {type(self.codec).__name__}")
        if self.collective != "auto" and self.collective not in ALGORITHMS:
            raise ValueError(f"collective must be 'auto' or one of {ALGORITHMS}, "
                             f"got {self.collective!r}")
        if self.collective == "allreduce" and not self.codec.summable:
            raise ValueError(f"collective 'allreduce' needs a summable codec (identity, fp16, "
                             f"bf16); {self.codec!r} payloads cannot be added")
        if self.error_feedback is not None and self.error_feedback not in FEEDBACK_KINDS:
            raise ValueError(f"error_feedback must be None or one of {FEEDBACK_KINDS}, "
                             f"got {self.error_feedback!r}")
        if self.error_feedback is not None and not self.codec.feedback_safe:
            raise ValueError(f"error_feedback={self.error_feedback!r} diverges with {self.codec!r}: "
                             f"its relative variance is far above 1, so the memories grow "
                             f"without bound; it is unbiased, use it without error feedback")
        if self.server_feedback and self.error_feedback != "ef":
            raise ValueError("server_feedback=True needs error_feedback='ef'")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def describe(self) -> Dict:
        """A JSON-able description (the codec by its repr), for checkpoints and agreement."""
        return {"codec": repr(self.codec), "collective": self.collective,
                "error_feedback": self.error_feedback, "server_feedback": self.server_feedback,
                "seed": self.seed}

    def rank_seed(self, rank: int) -> int:
        """The seed of rank ``rank``'s rounding generator: independent noise across ranks,
        reproducible runs."""
        return self.seed * 1_000_003 + rank

    def shared(self) -> Dict:
        """What every rank must have alike: :meth:`describe` without the seed, which may differ
        per rank by design, and the payload format version (decoders on an accelerator trust
        the agreement instead of reading each header)."""
        return {**{k: v for k, v in self.describe().items() if k != "seed"},
                "wire_format": FORMAT_VERSION}
