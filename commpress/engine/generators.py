"""This rank's rounding generators: one per device, seeded from the configuration's seed and
the rank, saved and restored with the engine's checkpoint."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch


class RankGenerators:
    """The generators a rank's stochastic codecs draw rounding noise from, one per device,
    each seeded ``seed_of(rank)`` when first used or restored from a checkpoint's state. After
    another rank's checkpoint is adopted, :meth:`reseed` derives them from the step as well,
    so that ranks' noise stays independent."""

    def __init__(self, seed_of: Callable[[int], int]):
        self._seed_of = seed_of
        self._live: Dict[str, torch.Generator] = {}
        self._saved: Dict[str, torch.Tensor] = {}
        self._reseed_at: Optional[int] = None

    def get(self, device: torch.device, rank: int) -> torch.Generator:
        key = str(device)
        if key not in self._live:
            gen = torch.Generator(device=device)
            if key in self._saved:
                gen.set_state(self._saved.pop(key))
            else:
                seed = self._seed_of(rank)
                if self._reseed_at is not None:
                    seed = (seed * 1_000_033 + self._reseed_at) % (1 << 62)
                gen.manual_seed(seed)
            self._live[key] = gen
        return self._live[key]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Every device's generator state (those restored but not used yet included)."""
        return {**self._saved, **{key: gen.get_state() for key, gen in self._live.items()}}

    def load_state_dict(self, states: Dict[str, torch.Tensor]) -> None:
        self._live, self._saved = {}, dict(states)

    def reseed(self, step: int) -> None:
        """Drop every state: generators are derived afresh from (seed, rank, ``step``)."""
        self._live, self._saved, self._reseed_at = {}, {}, step
