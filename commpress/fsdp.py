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
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.distributed as dist

from .codecs import Codec, saturating_cast
from .comm.collectives import compressed_reduce_scatter
from .comm.transport import TorchTransport
from .config import CompressionConfig
from .feedback import ErrorFeedback
from .names import state_of
from .stats import CommStats

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
except ImportError:  # pragma: no cover - depends on the torch version
    FSDPModule, ReduceScatter = None, object

#: gradient dtypes the codecs take (FSDP's reduce dtype)
_REDUCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FSDPCompressionState:
    """Configuration, statistics and error-feedback memories of one model's compressed
    reduce-scatters (see :func:`compress`).

    Args:
        codec: the :class:`~commpress.Codec` each shard is encoded with.
        error_feedback: None or ``"ef"``: each rank keeps, per FSDP module, what compression
            lost of its whole (unsharded) flat gradient and adds it to the next one. That is
            one fp32 copy of the module's unsharded gradient per rank, W times the module's
            shard: the memory FSDP's sharding saves on gradients. ``"ef21"`` is refused (its
            shared estimate needs the full mean, which a reduce-scatter does not produce).
        seed: stochastic rounding on rank ``r`` uses a generator seeded from ``(seed, r)``.
        policy: ``"fixed"``, the codec on every reduce-scatter. (The DDP hook's calibrated
            policy, which times fp32, bf16 and the codec first, is not available here yet:
            ``"calibrated"`` is refused rather than silently run as ``"fixed"``.)
    """

    def __init__(self, codec: Codec, error_feedback: Optional[str] = None, seed: int = 0,
                 policy: str = "fixed"):
        self.config = CompressionConfig(codec, "reduce_scatter", error_feedback, False, seed)
        if policy != "fixed":
            raise ValueError(f"commpress.fsdp runs policy='fixed' only (the codec on every "
                             f"reduce-scatter); got {policy!r}")
        if error_feedback == "ef21":
            raise ValueError("commpress.fsdp takes error_feedback=None or 'ef': EF21's shared "
                             "estimate needs the full mean, which a reduce-scatter does not "
                             "give any rank")
        self.policy = policy
        self.stats = CommStats()
        self.feedback = ErrorFeedback(error_feedback) if error_feedback else None
        self.iter = 0
        self._step_open = False
        self._generators: Dict[str, torch.Generator] = {}
        self._transports: Dict[dist.ProcessGroup, TorchTransport] = {}

    codec = property(lambda self: self.config.codec)
    error_feedback = property(lambda self: self.config.error_feedback)

    def transport(self, group: dist.ProcessGroup, device: torch.device) -> TorchTransport:
        if group not in self._transports:
            self._transports[group] = TorchTransport(group, device if device.type == "cuda" else None)
        return self._transports[group]

    def generator(self, device: torch.device, rank: int) -> Optional[torch.Generator]:
        if not self.codec.stochastic:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(
                self.config.seed * 1_000_003 + rank)
        return self._generators[key]

    def _step_started(self) -> None:
        """At a backward's first reduce-scatter: close the step when that backward ends."""
        if self._step_open:
            return
        self._step_open = True
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_step)
        except RuntimeError:  # not inside a backward (a direct call): the call is the step
            self._step_open = False
            self.iter += 1
            self.stats.end_step()

    def _end_step(self) -> None:
        self._step_open = False
        self.iter += 1
        self.stats.end_step()

    def state_dict(self) -> Dict:
        return {"iter": self.iter, "stats": self.stats.state_dict(),
                "rng": {key: gen.get_state() for key, gen in self._generators.items()},
                "feedback": self.feedback.state_dict() if self.feedback else None}

    def load_state_dict(self, state: Dict) -> None:
        """Restore :meth:`state_dict` (this rank's: memories and generators are per rank)."""
        missing = [k for k in ("iter", "stats", "rng", "feedback") if k not in state]
        if missing:
            raise ValueError(f"not a commpress.fsdp state dict: missing {missing}")
        if (state["feedback"] is None) != (self.feedback is None):
            raise ValueError("checkpoint and state differ in error feedback")
        if self.feedback is not None:
            self.feedback.load_state_dict(state["feedback"])
        self.iter = state["iter"]
        self.stats.load_state_dict(state["stats"])
        self._generators = {}
        for key, rng in state["rng"].items():
            gen = torch.Generator(device=key)
            gen.set_state(rng)
            self._generators[key] = gen


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
        scale = _scale_of(op, group.size())
        if input_tensor.dtype not in _REDUCE_DTYPES:
            raise TypeError(f"commpress.fsdp: reduce dtype {input_tensor.dtype} is not one the "
                            f"codecs take (float32, bfloat16, float16): set "
                            f"MixedPrecisionPolicy(reduce_dtype=...) to one of them")
        state._step_started()
        device = input_tensor.device
        transport = state.transport(group, device)
        w = transport.world_size
        state.stats.add(fp32_bytes=(w - 1) * 4 * input_tensor.numel() // w)
        flat = input_tensor.reshape(-1)
        feedback, key = state.feedback, [self.name]
        sent = feedback.compensate(key, flat, [flat.numel()]) if feedback else flat
        mean = compressed_reduce_scatter(sent, state.codec, transport,
                                         state.generator(device, transport.rank), state.stats,
                                         residual_out=sent if feedback else None)
        if feedback:
            feedback.update(key, sent, None, mean, [flat.numel()])
        if scale != 1.0:
            mean.mul_(scale)
        output_tensor.reshape(-1).copy_(saturating_cast(mean, output_tensor.dtype))
        return _Completed() if async_op else None


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
             **kwargs) -> FSDPCompressionState:
    """Make every FSDP module of ``model`` (``fully_shard`` applied to it or its submodules)
    reduce-scatter its gradients through ``state``: a :class:`FSDPCompressionState`, a hook
    name such as ``"qsgd4"`` or ``"qsgd8+ef"``, or a :class:`~commpress.Codec` (``kwargs`` go
    to the state made from a name or codec). Call it on every rank, after ``fully_shard``.
    Returns the state.

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
    for name, module in modules:
        try:
            module.set_custom_reduce_scatter(CompressedReduceScatter(state, name or "<root>"))
        except ValueError as exc:  # several parameter groups (per-parameter meshes)
            raise ValueError(f"commpress.fsdp: module {name or '<root>'!r}: {exc} Shard it with "
                             f"one mesh (no shard_placement_fn giving several)") from None
    return state
