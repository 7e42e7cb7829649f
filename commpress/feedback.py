"""Error-feedback memories, kept per parameter so they survive DDP's bucket rebuilds and resume.

- ``"ef"`` (EF-SGD / memory-SGD): send ``p = g + e``; keep ``e <- p - C(p)``. Needed by biased
  compressors, optional (off by default) for unbiased ones such as QSGD and C_nat.
- ``"ef21"`` (Richtarik et al., 2021): each worker keeps its estimate ``g_i`` and sends
  ``c_i = C(grad_i - g_i)``; then ``g_i += c_i`` and every rank applies ``g += mean(c_i)``,
  using ``g`` as the gradient.
- ``server=True`` (with ``"ef"``): a second memory for ``reduce_scatter``'s re-quantization of
  the averaged chunk, at the rank that reduces it (DeepSpeed 1-bit Adam's "server error").

A front end calls :meth:`ErrorFeedback.compensate` on a flat vector made of whole parameters,
sends the result through a compressed collective, then calls :meth:`ErrorFeedback.update`
with what was sent, its compressed version and the reduced mean. Memories are fp32 and live
on the gradient's device.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch

KINDS = ("ef", "ef21")
# the memories each kind keeps, by name
_MEMORIES = {"ef": ("residual",), "ef21": ("worker", "shared")}


class ErrorFeedback:
    def __init__(self, kind: str, server: bool = False):
        if kind not in KINDS:
            raise ValueError(f"error_feedback must be None or one of {KINDS}, got {kind!r}")
        if server and kind != "ef":
            raise ValueError("server-side error feedback needs error_feedback='ef'")
        self.kind, self.server = kind, server
        self._names = _MEMORIES[kind] + (("server",) if server else ())
        self.memories: Dict[str, Dict[torch.Tensor, torch.Tensor]] = {m: {} for m in self._names}
        self.names: Dict[torch.Tensor, str] = {}
        self._pending: Dict[str, Dict[str, torch.Tensor]] = {}

    def bind(self, named_parameters: Iterable) -> None:
        """Give the parameters names, so memories can be saved and restored by name."""
        self.names = {param: name for name, param in named_parameters}
        by_name = {name: param for param, name in self.names.items()}
        for memory, saved in self._pending.items():
            for name, value in saved.items():
                if name not in by_name:
                    raise ValueError(f"error-feedback memory for unknown parameter {name!r}")
                param = by_name[name]
                self.memories[memory][param] = value.to(param.device, torch.float32).reshape(-1)
        self._pending = {}

    # -- the two calls around a reduction ------------------------------------------------
    def compensate(self, params: Sequence[torch.Tensor], flat: torch.Tensor) -> torch.Tensor:
        """What to compress instead of the gradient ``flat`` (which is left untouched)."""
        if self.kind == "ef":
            return flat.float() + self._gather("residual", params, flat)
        return flat.float() - self._gather("worker", params, flat)

    def update(self, params: Sequence[torch.Tensor], sent: torch.Tensor, local: torch.Tensor,
               mean: torch.Tensor) -> torch.Tensor:
        """Update the memories; return the vector to use as the averaged gradient."""
        if self.kind == "ef":
            self._scatter("residual", params, sent - local)
            return mean
        self._scatter("worker", params, self._gather("worker", params, local) + local)
        shared = self._gather("shared", params, mean) + mean
        self._scatter("shared", params, shared)
        return shared

    def server_memory(self, params: Sequence[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
        """The server residual for ``params`` (to pass to ``compressed_mean``), or None."""
        return self._gather("server", params, like) if self.server else None

    def store_server_memory(self, params: Sequence[torch.Tensor], residual: Optional[torch.Tensor]) -> None:
        if residual is not None:
            self._scatter("server", params, residual)

    def mask_(self, masks: Dict[torch.Tensor, torch.Tensor]) -> None:
        """Zero the memories where ``masks[param]`` is 0 (entries pruned by AC/DC)."""
        for memory in self.memories.values():
            for param, mask in masks.items():
                if param in memory:
                    memory[param].mul_(mask.reshape(-1).to(memory[param].dtype))

    # -- storage --------------------------------------------------------------------------
    def _gather(self, memory: str, params, like: torch.Tensor) -> torch.Tensor:
        store = self.memories[memory]
        parts = [store.get(p) if p in store else torch.zeros(p.numel(), device=like.device)
                 for p in params]
        return torch.cat(parts) if parts else torch.zeros(0, device=like.device)

    def _scatter(self, memory: str, params, flat: torch.Tensor) -> None:
        store = self.memories[memory]
        for param, part in zip(params, flat.split([p.numel() for p in params])):
            store[param] = part

    def state_dict(self) -> Dict:
        out: Dict = {"kind": self.kind}
        for memory, store in self.memories.items():
            missing = [p for p in store if p not in self.names]
            if missing:
                raise RuntimeError("error-feedback memories cannot be saved without parameter "
                                   "names: register the hook with commpress.register_hook(model, "
                                   "state) or call state.bind(model) first")
            out[memory] = {self.names[p]: v.detach().cpu().clone() for p, v in store.items()}
        out.update({m: {**out.get(m, {}), **saved} for m, saved in self._pending.items()})
        return out

    def load_state_dict(self, state: Dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds {state.get('kind')!r} error feedback, this state "
                             f"uses {self.kind!r}")
        self.memories = {m: {} for m in self._names}
        self._pending = {m: dict(state.get(m, {})) for m in self._names}
        if self.names:
            self.bind((name, p) for p, name in self.names.items())
