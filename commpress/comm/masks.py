"""Which gradient entries a reduction sends: the AC/DC mask as the hook and the pipeline see it
(decided by :mod:`commpress.acdc`, applied here)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..layout import flat_numel, to_bucket_order


def in_bucket_order(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (of ``param``'s shape) flattened in the order DDP's bucket holds ``param``'s
    gradient: a dense parameter's memory order (DDP lays its gradient out with the
    parameter's strides: a channels_last weight is not row-major), a complex entry as its
    two reals."""
    values = torch.stack([mask, mask], -1) if param.is_complex() else mask
    return to_bucket_order(param, values.reshape(-1))


class GradientMask:
    """What the compression hook needs of AC/DC: which gradient entries to send. Holds one
    flat boolean mask per parameter (:meth:`set`, at every prune and restore) and gives, for
    a run of parameters laid end to end, the indices of the entries under the mask, cached
    until the masks change (one ``nonzero`` per run and phase, not per step)."""

    def __init__(self):
        self.masks: Dict[torch.Tensor, torch.Tensor] = {}
        self._kept: Dict[tuple, Optional[torch.Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self.masks)

    def set(self, masks: Dict[torch.Tensor, torch.Tensor]) -> None:
        """``{param: mask}``; ``{}`` sends everything."""
        self.masks = {p: in_bucket_order(p, m.bool()) for p, m in masks.items()}
        self._kept = {}

    def kept_indices(self, params: List[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
        """Indices, in the concatenation of ``params``' gradients, of the entries under the
        mask; None when none of them is masked."""
        if not self.masks:
            return None
        key = tuple(id(p) for p in params)
        if key not in self._kept:
            self._kept[key] = None
            if any(p in self.masks for p in params):
                parts, offset = [], 0
                for p in params:
                    mask = self.masks.get(p)
                    kept = (mask.to(device).nonzero().view(-1) if mask is not None
                            else torch.arange(flat_numel(p), device=device))
                    parts.append(kept + offset)
                    offset += flat_numel(p)
                self._kept[key] = torch.cat(parts)
        return self._kept[key]
