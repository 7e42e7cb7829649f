"""Pack unsigned ``bits``-wide integers (1 <= bits <= 8) densely into uint8, and back.

Value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the little-endian bit stream. Widths
that divide 8 take a fast path (several codes per byte); other widths go through a bit
expansion, still vectorised.
"""
from __future__ import annotations

import torch


def packed_bytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an integer in 1..8, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of values < 2**bits into ``packed_bytes(numel, bits)`` bytes."""
    _check_bits(bits)
    if bits == 8:
        return codes
    n = codes.numel()
    out_len = packed_bytes(n, bits)
    if 8 % bits == 0:
        per_byte = 8 // bits
        if n % per_byte:
            padded = torch.zeros(out_len * per_byte, dtype=torch.uint8, device=codes.device)
            padded[:n] = codes
            codes = padded
        groups = codes.view(out_len, per_byte)
        out = groups[:, 0].clone()
        for k in range(1, per_byte):  # at most 8 vectorised steps, not a per-element loop
            out |= groups[:, k] << (k * bits)
        return out
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = torch.zeros(out_len * 8, dtype=torch.uint8, device=codes.device)
    stream[: n * bits] = ((codes.unsqueeze(1) >> shifts) & 1).view(-1)
    weights = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (stream.view(out_len, 8) << weights).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a uint8 tensor."""
    _check_bits(bits)
    if packed.numel() != packed_bytes(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {numel} "
                         f"{bits}-bit codes")
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(1) >> shifts) & mask).view(-1)[:numel]
    weights = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(1) >> weights) & 1).view(-1)[: numel * bits].view(numel, bits)
    shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream << shifts).sum(dim=1, dtype=torch.uint8)
