"""Communication statistics: bytes on the wire against an fp32 all-reduce, and where time goes.

``wire_bytes`` is what this rank handed to the engine, weighted by the bytes each collective
algorithm sends per rank (see :class:`~commpress.comm.transport.Transport`), of which
``intra_node_bytes`` went to ranks of the same node (hierarchical collective only);
``fp32_bytes`` is what a ring all-reduce of the same gradients in fp32 would have sent (the
fp32 equivalent; not "dense", which names AC/DC's phases),
``2(W-1)/W * 4 * numel``. Their ratio (against the bytes that left the node) is the saving, after every overhead (headers, scales,
padding, the uncompressed small layers, the plain warm-up steps).
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Dict


@dataclass
class StepCounters:
    wire_bytes: int = 0
    #: the part of ``wire_bytes`` sent to ranks on the same node (hierarchical collective)
    intra_node_bytes: int = 0
    fp32_bytes: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    comm_seconds: float = 0.0

    @property
    def network_bytes(self) -> int:
        """What left the node (everything, for collectives that do not know the topology)."""
        return self.wire_bytes - self.intra_node_bytes

    @property
    def dense_bytes(self) -> int:
        """``fp32_bytes`` under the name of the design's public API (read-only), which users'
        scripts and tests written against it rely on."""
        return self.fp32_bytes

    @property
    def ratio(self) -> float:
        """fp32 / network: how many times fewer bytes than an fp32 all-reduce puts on the
        network."""
        return self.fp32_bytes / self.network_bytes if self.network_bytes else float("nan")


@dataclass
class CommStats(StepCounters):
    """Cumulative counters (the inherited fields), ``steps``, and ``last_step``: the counters
    of the most recently finished step. Thread-safe: reductions report from a worker thread."""

    steps: int = 0
    last_step: StepCounters = field(default_factory=StepCounters)
    #: the calibrated policy's plan, in words (set by the front end; not a counter)
    plan: str = ""

    def __post_init__(self):
        self._lock = threading.Lock()
        self._current = StepCounters()

    def add(self, **amounts) -> None:
        with self._lock:
            for name, value in amounts.items():
                setattr(self, name, getattr(self, name) + value)
                setattr(self._current, name, getattr(self._current, name) + value)

    def end_step(self) -> None:
        """Close the current step (call once all its reductions have finished)."""
        with self._lock:
            self.steps += 1
            self.last_step, self._current = self._current, StepCounters()

    def absorb(self, step: StepCounters) -> None:
        """Count ``step`` as one more finished step of this (e.g. per-phase) tally."""
        with self._lock:
            for f in fields(StepCounters):
                setattr(self, f.name, getattr(self, f.name) + getattr(step, f.name))
            self.steps += 1
            self.last_step = StepCounters(**asdict(step))

    def per_step(self) -> Dict[str, float]:
        n = max(self.steps, 1)
        counters = {f.name: getattr(self, f.name) / n for f in fields(StepCounters)}
        return {**counters, "network_bytes": self.network_bytes / n}

    def summary(self) -> str:
        if self.steps == 0:  # say so plainly: the usual cause is a hook that was never registered
            return ("no step yet: nothing was reduced through commpress (a DDP hook that was never "
                    "registered? Lightning's DDPStrategy registers comm hooks only on CUDA: use "
                    "commpress.lightning.CompressedDDPStrategy)")
        intra = (f" (+{self.intra_node_bytes / 1e6:.2f} MB inside the node)"
                 if self.intra_node_bytes else "")
        return (f"step {self.steps}: wire {self.network_bytes / 1e6:.2f} MB{intra} vs fp32 "
                f"all-reduce {self.fp32_bytes / 1e6:.2f} MB ({self.ratio:.2f}x fewer); last step "
                f"{self.last_step.network_bytes / 1e3:.1f} kB ({self.last_step.ratio:.2f}x); "
                f"encode {self.encode_seconds:.2f}s decode {self.decode_seconds:.2f}s "
                f"comm {self.comm_seconds:.2f}s" + (f"; {self.plan}" if self.plan else ""))

    def state_dict(self) -> Dict:
        counters = {f.name: getattr(self, f.name) for f in fields(StepCounters)}
        return {**counters, "steps": self.steps, "last_step": asdict(self.last_step)}

    def load_state_dict(self, state: Dict) -> None:
        state, last = _renamed(state), _renamed(state["last_step"])
        with self._lock:
            for f in fields(StepCounters):
                setattr(self, f.name, state.get(f.name, 0))
            self.steps = state["steps"]
            self.last_step = StepCounters(**{f.name: last.get(f.name, 0) for f in fields(StepCounters)})
            self._current = StepCounters()

    def __getstate__(self):
        return self.state_dict()

    def __setstate__(self, state):
        self.__post_init__()
        self.last_step = StepCounters()
        self.load_state_dict(state)


def _renamed(counters: Dict) -> Dict:
    """Counters of an older checkpoint, where ``fp32_bytes`` was called ``dense_bytes``."""
    if "dense_bytes" in counters and "fp32_bytes" not in counters:
        counters = {**counters, "fp32_bytes": counters["dense_bytes"]}
    return counters
