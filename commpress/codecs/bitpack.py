"""Pack unsigned ``bits``-wide integers (1 <= bits <= 8) densely into uint8, and back.

Value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the little-endian bit stream. Codes go
in groups of ``8 / gcd(8, bits)`` that fill ``bits / gcd(8, bits)`` whole bytes (2 codes in
1 byte at 4 bits, 8 codes in 3 bytes at 3 bits): a few vectorised column operations per
group, with no per-bit expansion, and the same source compiles into one fused loop.

:func:`pack_tiled` is the codecs' layout: the same groups, but each of ``LANES`` groups in a
tile packs codes ``LANES`` apart, so that a compiled kernel loads and stores runs of
``LANES`` consecutive values and bytes instead of gathering every ``k``-th one.
"""
from __future__ import annotations

import math

import torch


def packed_bytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def group_shape(bits: int):
    """``(codes, bytes)`` of one group: the fewest codes that fill whole bytes."""
    common = math.gcd(8, bits)
    return 8 // common, bits // common


#: groups per tile of :func:`pack_tiled`: one vector register of fp32 (AVX-512) per code row
LANES = 16


def tile_values(bits: int) -> int:
    """Codes per tile of :func:`pack_tiled`."""
    return group_shape(bits)[0] * LANES


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an integer in 1..8, got {bits!r}")


def word_dtype(bits: int) -> torch.dtype:
    """The integer type that holds one packing group's word."""
    return torch.int32 if group_shape(bits)[0] * bits <= 31 else torch.int64


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of values < 2**bits into ``packed_bytes(numel, bits)`` bytes."""
    _check_bits(bits)
    if bits == 8:
        return codes
    n = codes.numel()
    per_group = group_shape(bits)[0]
    if n % per_group:
        padded = torch.zeros(-(-n // per_group) * per_group, dtype=torch.uint8, device=codes.device)
        padded[:n] = codes
        codes = padded
    groups = codes.view(-1, per_group)
    return pack_columns([groups[:, k] for k in range(per_group)], bits)[: packed_bytes(n, bits)]


def pack_columns(columns, bits: int) -> torch.Tensor:
    """Pack codes given as ``group_shape(bits)[0]`` equal-length columns (code ``k`` of every
    group): the bytes of the groups, in order."""
    wide, group_bytes = word_dtype(bits), group_shape(bits)[1]
    word = columns[0].to(wide)
    for k in range(1, len(columns)):  # at most 8 vectorised steps, not a per-element loop
        word = word | (columns[k].to(wide) << (k * bits))
    if group_bytes == 1:
        return word.to(torch.uint8)
    return torch.stack([(word >> (8 * j)).to(torch.uint8) for j in range(group_bytes)], 1).view(-1)


def unpack(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a uint8 tensor."""
    _check_bits(bits)
    if packed.numel() != packed_bytes(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {numel} "
                         f"{bits}-bit codes")
    if bits == 8:
        return packed
    per_group, group_bytes = group_shape(bits)
    whole = -(-numel // per_group) * group_bytes
    if packed.numel() < whole:
        padded = torch.zeros(whole, dtype=torch.uint8, device=packed.device)
        padded[: packed.numel()] = packed
        packed = padded
    return torch.stack(unpack_columns(packed, bits), 1).view(-1)[:numel]


def unpack_columns(packed: torch.Tensor, bits: int) -> list:
    """Inverse of :func:`pack_columns` for whole groups: the columns of codes (uint8)."""
    per_group, group_bytes = group_shape(bits)
    if bits == 8:
        return [packed]
    wide, mask = word_dtype(bits), (1 << bits) - 1
    groups = packed.view(-1, group_bytes)
    word = groups[:, 0].to(wide)
    for j in range(1, group_bytes):
        word = word | (groups[:, j].to(wide) << (8 * j))
    return [((word >> (k * bits)) & mask).to(torch.uint8) for k in range(per_group)]


def pack_tiled(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor like :func:`pack` (same length), tile by tile: in each whole
    tile of :func:`tile_values` codes, group ``j < LANES`` packs codes ``j, j + LANES, ...``
    (code ``k`` of the group is tile code ``k * LANES + j``), and byte ``b`` of the group's
    little-endian word lies at tile byte ``b * LANES + j``. Codes after the last whole tile
    are packed as :func:`pack` packs them."""
    _check_bits(bits)
    per_group, group_bytes = group_shape(bits)
    whole = codes.numel() // (per_group * LANES) * (per_group * LANES)
    if bits == 8 or whole == 0:  # one code per byte: the tiled layout is the plain one
        return pack(codes, bits)
    rows = codes[:whole].view(-1, per_group, LANES)
    words = pack_columns([rows[:, k, :].reshape(-1) for k in range(per_group)], bits)
    tiles = words.view(-1, LANES, group_bytes).transpose(1, 2).reshape(-1)
    return torch.cat([tiles, pack(codes[whole:], bits)])


def unpack_tiled(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_tiled`: the first ``numel`` codes as a uint8 tensor."""
    _check_bits(bits)
    per_group, group_bytes = group_shape(bits)
    whole = numel // (per_group * LANES) * (per_group * LANES)
    if bits == 8 or whole == 0:
        return unpack(packed, numel, bits)
    if packed.numel() != packed_bytes(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {numel} "
                         f"{bits}-bit codes")
    head = whole * bits // 8
    groups = packed[:head].view(-1, group_bytes, LANES).transpose(1, 2).reshape(-1)
    columns = unpack_columns(groups, bits)
    tiles = torch.stack([c.view(-1, LANES) for c in columns], 1).view(-1)
    return torch.cat([tiles, unpack(packed[head:], numel - whole, bits)])
