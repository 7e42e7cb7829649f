"""Magnitude masks over Conv/Linear and attention projection weights, decided on one rank and
broadcast bit-packed."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..codecs import bitpack
from ..comm.transport import Transport

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: MultiheadAttention keeps its input projections as parameters of its own, not as Linear
#: layers: a quarter of a transformer block's weights
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
SCOPES = ("global", "layerwise")


def prunable_weights(model: nn.Module, keep_first_last: bool = False) -> List[Tuple[str, nn.Parameter]]:
    """``(name, weight)`` of the Conv/Linear layers and of MultiheadAttention's input
    projections, in registration order; biases, embeddings and norm layers are never pruned.
    ``keep_first_last`` leaves the first and last such weight dense."""
    found = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, PRUNABLE):
            found.append((f"{dot}weight", module.weight))
        elif isinstance(module, nn.MultiheadAttention):
            found += [(f"{dot}{name}", getattr(module, name)) for name in ATTENTION_PROJECTIONS
                      if getattr(module, name, None) is not None]
    return found[1:-1] if keep_first_last else found


def magnitude_masks(weights: List[Tuple[str, torch.Tensor]], sparsity: float,
                    scope: str = "global") -> Dict[str, torch.Tensor]:
    """Boolean masks keeping the largest-magnitude ``1 - sparsity`` of the weights: over all
    layers together (``global``) or in each layer (``layerwise``). Exactly
    ``round((1 - sparsity) * n)`` entries are kept; ties are broken by ``topk``, which is why
    masks must be decided on one rank."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not weights:
        return {}

    def keep_top(values: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
        k = round((1.0 - sparsity) * values.numel())
        keep[torch.topk(values, k, sorted=False).indices] = True
        return keep

    if scope == "layerwise":
        return {name: keep_top(w.detach().abs().reshape(-1)).view(w.shape) for name, w in weights}
    flat = keep_top(torch.cat([w.detach().abs().reshape(-1) for _, w in weights]))
    parts = flat.split([w.numel() for _, w in weights])
    return {name: part.view(w.shape) for (name, w), part in zip(weights, parts)}


def broadcast_masks(masks: Dict[str, torch.Tensor], shapes: List[Tuple[str, torch.Size]],
                    transport: Optional[Transport], device: torch.device, src: int = 0) -> Dict[str, torch.Tensor]:
    """Rank ``src``'s masks on every rank, sent as one bit-packed uint8 vector (1 bit per
    weight). Other ranks pass ``masks={}`` and get the masks for ``shapes``."""
    sizes = [shape.numel() for _, shape in shapes]
    total = sum(sizes)
    if transport is None or transport.world_size == 1:
        return masks
    if transport.rank == src:
        bits = torch.cat([masks[name].reshape(-1) for name, _ in shapes]).to(torch.uint8)
        packed = bitpack.pack(bits.to(device), 1)
    else:
        packed = torch.empty(bitpack.packed_bytes(total, 1), dtype=torch.uint8, device=device)
    packed = transport.broadcast(packed, src)
    flat = bitpack.unpack(packed, total, 1).bool()
    return {name: part.view(shape) for (name, shape), part in zip(shapes, flat.split(sizes))}
