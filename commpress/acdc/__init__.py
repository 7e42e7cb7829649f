"""AC/DC: alternating dense and sparse phases, with sparse-phase communication of the mask only."""
from .coordinator import ACDC
from .masks import broadcast_masks, magnitude_masks, prunable_weights
from .schedule import ACDCSchedule

__all__ = ["ACDC", "ACDCSchedule", "magnitude_masks", "prunable_weights", "broadcast_masks"]
