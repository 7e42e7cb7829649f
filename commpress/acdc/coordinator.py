"""The AC/DC coordinator: alternates dense and sparse phases and tells the hook the mask."""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..comm.agreement import agree
from ..comm.transport import TorchTransport
from ..ddp import CompressionState
from .masks import SCOPES, broadcast_masks, magnitude_masks, prunable_weights
from .schedule import ACDCSchedule

logger = logging.getLogger("commpress.acdc")


def is_scale_state(key: str) -> bool:
    """Whether the optimizer state ``key`` holds squared-gradient averages (a per-entry scale,
    never a direction): ``exp_avg_sq``, ``max_exp_avg_sq``, ``square_avg``, Adagrad's ``sum``."""
    return "sq" in key or "square" in key or key == "sum"


class ACDC:
    """Alternating Compressed/DeCompressed training (Peste et al., 2021), co-scheduled with
    communication: in sparse phases the hook of ``state`` sends only the gradient entries under
    the mask (shared by all ranks, so no index bits), through its codec.

    Call :meth:`step` after every ``optimizer.step()``. At a prune it snapshots the dense
    weights, decides magnitude masks on rank 0 and broadcasts them bit-packed, zeroes the
    pruned weights, their momentum and their error-feedback memories (each stage of the
    schedule's ramp, ``ACDCSchedule.ramp_steps``, prunes further the same way); during a
    sparse phase it re-applies the masks after every step, so pruned weights stay exactly
    zero; at a restore the pruned weights come back as zeros with their directional optimizer
    state (momentum, Adam's first moment) zeroed and their scale state (Adam's second moment)
    kept, while the kept weights' state goes on.

    Args:
        model: the (DDP-wrapped or plain) model; Conv/Linear weights and MultiheadAttention's
            input projections are pruned.
        optimizer: its optimizer.
        state: the :class:`CompressionState` of the model's hook (None: no hook, masks only).
        sparsity: fraction of the prunable weights set to zero in sparse phases, in [0, 1).
        schedule: an :class:`ACDCSchedule` over optimizer steps.
        scope: ``"global"`` magnitude top-k over all layers, or ``"layerwise"`` uniform.
        keep_first_last: leave the first and last of those weights dense.

    Example::

        >>> state = commpress.register_hook(ddp_model, "qsgd4")
        >>> acdc = commpress.ACDC(ddp_model, opt, state, sparsity=0.9,
        ...                       schedule=commpress.ACDCSchedule.paper(epochs, steps_per_epoch))
        >>> for x, y in loader:
        ...     loss_fn(ddp_model(x), y).backward(); opt.step(); opt.zero_grad(); acdc.step()
        >>> sparse_weights, dense_weights = acdc.sparse_dense_pair()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 state: Optional[CompressionState] = None, sparsity: float = 0.9,
                 schedule: Optional[ACDCSchedule] = None, scope: str = "global",
                 keep_first_last: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (plain or DDP-wrapped), got {type(model).__name__}")
        if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
            raise TypeError(f"optimizer must be the model's torch optimizer, got {type(optimizer).__name__}")
        if state is not None and not isinstance(state, CompressionState):
            raise TypeError(f"state must be the model's CompressionState or None, got "
                            f"{type(state).__name__} (commpress.register_hook returns it)")
        if (not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool)
                or not 0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if not isinstance(schedule, ACDCSchedule):
            raise ValueError("schedule must be an ACDCSchedule, e.g. ACDCSchedule.paper(epochs)")
        self.module = model.module if hasattr(model, "module") else model
        self.optimizer, self.state = optimizer, state
        self.sparsity, self.schedule, self.scope = float(sparsity), schedule, scope
        self.weights = prunable_weights(self.module, keep_first_last)
        if not self.weights:
            raise ValueError("the model has no Conv/Linear or attention projection weights to prune")
        updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missed = [name for name, w in self.weights if w.requires_grad and id(w) not in updated]
        if missed:  # its momentum would not be masked, nor the weights it trains pruned
            raise ValueError(f"the optimizer does not update the model's weights {missed[:3]}"
                             f"{' ...' if len(missed) > 3 else ''}: pass the optimizer of this model")
        self.steps = 0
        self.phase = "dense"
        self.masks: Dict[str, torch.Tensor] = {}
        # each member's weights when its last phase ended (see sparse_dense_pair)
        self.dense_snapshot: Optional[Dict[str, torch.Tensor]] = None
        self.sparse_snapshot: Optional[Dict[str, torch.Tensor]] = None
        if state is not None:
            state.bind(self.module)
        if self.schedule.phase_at(0) == "sparse":
            self._enter("sparse")

    # -- the training-loop call -----------------------------------------------------------
    def step(self) -> None:
        if self.phase == "sparse":
            self._apply_masks()
        self.steps += 1
        phase = self.schedule.phase_at(self.steps)
        if phase != self.phase:
            self._enter(phase)
        elif phase == "sparse" and (self.schedule.sparsity_fraction(self.steps)
                                    != self.schedule.sparsity_fraction(self.steps - 1)):
            self._prune()  # the next stage of the first sparse phase's ramp

    @property
    def density(self) -> float:
        """Fraction of the prunable weights currently allowed to be non-zero."""
        if not self.masks:
            return 1.0
        return sum(int(m.sum()) for m in self.masks.values()) / sum(w.numel() for _, w in self.weights)

    def sparse_dense_pair(self) -> Tuple[Optional[Dict[str, torch.Tensor]], Optional[Dict[str, torch.Tensor]]]:
        """``(sparse, dense)``: the run's two members, as state dicts. The member of the
        current phase is the current weights; the other is the weights at the end of its last
        phase (a run that ended dense gives the sparse weights as they were when the last
        sparse phase ended; the paper's schedule ends sparse, so its dense member is the end
        of the last dense phase). None for a kind of phase the run has not had yet."""
        current = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        if self.phase == "sparse":
            return current, self.dense_snapshot
        return self.sparse_snapshot, current

    # -- transitions ----------------------------------------------------------------------
    def _enter(self, phase: str) -> None:
        if phase == "sparse":
            self.dense_snapshot = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self._prune()
        else:
            self.sparse_snapshot = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self._mask_optimizer_state(self.masks)  # pruned weights return as zeros, and so do
            self._set_masks({})                     # their moments; the kept ones go on
            logger.info("AC/DC step %d: dense phase", self.steps)
        self.phase = phase
        if self.state is not None:
            self.state.phase = phase

    def _prune(self) -> None:
        """Masks at the schedule's sparsity for this step, decided on rank 0 and broadcast;
        the pruned weights and their directional optimizer state zeroed."""
        sparsity = self.sparsity * self.schedule.sparsity_fraction(self.steps)
        transport, device = self._transport(), self.weights[0][1].device
        if transport is not None:  # a rank pruning a step early fails, named
            control = self.state.control_transport if self.state is not None else transport
            agree(control, {"acdc_phase": "sparse", "acdc_step": self.steps,
                            "sparsity": sparsity}, control.device)
        local = magnitude_masks(self.weights, sparsity, self.scope) if self._rank() == 0 else {}
        self._set_masks(broadcast_masks(local, [(n, w.shape) for n, w in self.weights],
                                        transport, device))
        self._apply_masks()
        logger.info("AC/DC step %d: sparse phase, density %.3f", self.steps, self.density)

    def _set_masks(self, masks: Dict[str, torch.Tensor]) -> None:
        self.masks = masks
        by_param = {w: masks[name] for name, w in self.weights if name in masks}
        if self.state is not None:
            self.state.set_masks(by_param)
        self._mask_optimizer_state(masks)  # moments of pruned entries must not leak back

    @torch.no_grad()
    def _mask_optimizer_state(self, masks: Dict[str, torch.Tensor]) -> None:
        """Zero the optimizer's per-entry directional state (SGD's momentum, Adam's first
        moment, ...) where ``masks`` prune. Only there: resetting the whole state at every
        phase change, as the reference implementation does, restarts the kept weights'
        momentum too, which on short phases cost 17 points of accuracy at sparsity 0 (digits,
        3 epochs). Scale state (second moments: Adam's ``exp_avg_sq``, RMSprop's
        ``square_avg``, Adagrad's ``sum``; see :func:`is_scale_state`) is kept: zeroed, it
        makes Adam's first steps on restored weights 3-6 times its usual size (its bias
        correction assumes the entry's whole history), and every restore set the
        transformer's loss back by about 0.2 nats."""
        for name, w in self.weights:
            mask = masks.get(name)
            if mask is None:
                continue
            for key, value in self.optimizer.state.get(w, {}).items():
                if (isinstance(value, torch.Tensor) and value.shape == w.shape
                        and not is_scale_state(key)):
                    value.mul_(mask)

    @torch.no_grad()
    def _apply_masks(self) -> None:
        """Pruned weights back to zero after a step, and their optimizer state (without a
        hook, or on a rank whose gradient was not masked, it gathered their gradients)."""
        for name, w in self.weights:
            w.mul_(self.masks[name])
        self._mask_optimizer_state(self.masks)

    def _transport(self):
        if self.state is not None:
            return self.state.transport
        return TorchTransport() if dist.is_available() and dist.is_initialized() else None

    def _rank(self) -> int:
        transport = self._transport()
        return transport.rank if transport is not None else 0

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"steps": self.steps, "phase": self.phase, "sparsity": self.sparsity,
                "scope": self.scope, "masks": {k: v.cpu() for k, v in self.masks.items()},
                "dense_snapshot": self.dense_snapshot, "sparse_snapshot": self.sparse_snapshot}

    def load_state_dict(self, state: Dict) -> None:
        validate_checkpoint(state, {name: w.shape for name, w in self.weights})
        if (state["sparsity"], state["scope"]) != (self.sparsity, self.scope):
            raise ValueError(f"checkpoint is AC/DC at sparsity {state['sparsity']} ({state['scope']}), "
                             f"this coordinator at {self.sparsity} ({self.scope})")
        self.steps, self.phase = state["steps"], state["phase"]
        device = self.weights[0][1].device
        self.masks = {}
        self._set_masks({k: v.to(device, torch.bool) for k, v in state["masks"].items()})
        self.dense_snapshot = state["dense_snapshot"]
        self.sparse_snapshot = state.get("sparse_snapshot")  # absent in older checkpoints
        if self.state is not None:
            self.state.phase = self.phase


def validate_checkpoint(state, shapes: Dict[str, torch.Size]) -> None:
    """Refuse, naming the problem, an :meth:`ACDC.state_dict` that is not of a coordinator of
    the weights ``shapes`` (name: shape): masks are multiplied into the weights, so one of
    another shape or with values other than 0/1 would corrupt them silently."""
    required = ("steps", "phase", "sparsity", "scope", "masks", "dense_snapshot")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"not an AC/DC checkpoint (ACDC.state_dict()): missing {missing}")
    steps, phase, masks = state["steps"], state["phase"], state["masks"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"AC/DC checkpoint: steps must be a non-negative integer, got {steps!r}")
    if phase not in ("dense", "sparse"):
        raise ValueError(f"AC/DC checkpoint: phase must be 'dense' or 'sparse', got {phase!r}")
    if not isinstance(masks, dict) or (phase == "sparse") != bool(masks):
        raise ValueError(f"AC/DC checkpoint: a {phase} phase needs "
                         f"{'a mask per prunable weight' if phase == 'sparse' else 'no masks'}")
    if masks and set(masks) != set(shapes):
        raise ValueError(f"AC/DC checkpoint masks {sorted(masks)} are not this model's "
                         f"prunable weights {sorted(shapes)}")
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.shape != shapes[name]:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"AC/DC checkpoint mask {name!r} is {got}, the weight "
                             f"{tuple(shapes[name])}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"AC/DC checkpoint mask {name!r} holds values other than 0 and 1")
