"""Shared machinery of the scaled-level codecs (QSGD, natural dithering).

Both split the flat vector into buckets of ``bucket_size`` values, scale each bucket by its
norm (one fp32 per bucket on the wire), round ``|x| / norm`` stochastically to one of
``levels + 1`` magnitudes, and send ``levels + sign * level`` as a ``bits``-wide code. They
differ only in the magnitudes and in how a value is rounded between its two neighbours.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import bitpack, kernels
from .base import Codec, chunk_ranges
from .fused import FusedMean
from .tiled import TiledKernels

_NORMS = {"max": 0, "l2": 1}
_SMALLEST_FP32 = 2.0 ** -149  # the smallest positive (subnormal) float32


def random_bits(numel: int, device: torch.device, generator: Optional[torch.Generator],
                bits: int = 23) -> torch.Tensor:
    """``numel`` independent uniform integers in ``[0, 2**bits)``, ``bits <= 31``, as int32.

    Drawn as int64 words split in two: one pass of the generator for two values, several
    times faster than ``torch.rand`` on CPU.
    """
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device)
    words.random_(generator=generator)
    return words.view(torch.int32)[:numel].bitwise_and_((1 << bits) - 1)


def uniform_1_2(numel: int, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Uniform floats in ``[1, 2)`` on a grid of ``2**-23``: 23 random mantissa bits under the
    exponent of 1.0, so no int-to-float conversion is needed."""
    return random_bits(numel, device, generator).bitwise_or_(0x3F800000).view(torch.float32)


def aligned(data: torch.Tensor, itemsize: int) -> torch.Tensor:
    """``data`` itself if it can be viewed as a dtype of ``itemsize`` bytes, else a copy
    (received payloads may start at any byte offset of a receive buffer)."""
    return data if data.storage_offset() % itemsize == 0 else data.clone()


def block_norms(magnitudes: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row max or L2 norm of a 2-D fp32 tensor of ``|x|``, propagating NaN/Inf and never
    overflowing for finite input (the L2 norm is taken of the max-scaled rows)."""
    peak = magnitudes.amax(dim=1)
    if norm == "max":
        return peak
    finite = torch.isfinite(peak)
    safe = torch.where(finite & (peak > 0), peak, torch.ones_like(peak))
    l2 = torch.linalg.vector_norm(magnitudes / safe.unsqueeze(1), dim=1) * safe
    # The L2 norm of finite values can exceed the fp32 range (512 x 1e38). Any scale at least
    # the bucket's largest magnitude keeps the rounding unbiased, so cap it at the fp32 maximum.
    return torch.where(finite, l2.clamp(max=torch.finfo(torch.float32).max), l2)


class BucketedLevelCodec(TiledKernels, FusedMean, Codec):
    """Base of codecs sending a norm per bucket and a signed level per entry."""

    stochastic = True

    def __init__(self, bits: int, levels: int, bucket_size: int, norm: str):
        if (not isinstance(bucket_size, int) or isinstance(bucket_size, bool) or bucket_size < 1
                or bucket_size >= 2 ** 32):
            raise ValueError(f"bucket_size must be an integer in 1..2**32 - 1 (the header "
                             f"stores it in 32 bits), got {bucket_size!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
        if 2 * levels + 1 > 2 ** bits:
            raise ValueError(f"{levels} levels and a sign do not fit in {bits} bits")
        self.bits, self.levels, self.bucket_size, self.norm = bits, levels, bucket_size, norm
        self.block_size = bucket_size
        self._tables = {}

    # -- subclass hooks -------------------------------------------------------------------
    def _level_magnitudes(self, level: torch.Tensor) -> torch.Tensor:
        """The magnitude (fp32, a fraction of the scale) of each level in ``level`` (fp32
        integers in ``0..levels``): level 0 is 0 and the top level 1."""
        raise NotImplementedError

    def _fractions(self, codes: torch.Tensor) -> torch.Tensor:
        """Code (fp32) -> signed fraction of the scale. Codes no encoder produces map to NaN,
        so a corrupted body can never pass as a plausible gradient."""
        signed = codes - self.levels
        fraction = self._level_magnitudes(signed.abs()).copysign(signed)
        return torch.where(codes <= 2 * self.levels, fraction, math.nan)

    #: ``_round`` receives ``|x| / norm * _ratio_unit``
    _ratio_unit = 1

    def _round(self, scaled: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Stochastic level index (float, clamped to 0..levels) of ``scaled``, which is in
        ``[0, _ratio_unit]`` up to rounding, given uniforms ``u`` in [1, 2). May overwrite
        ``scaled`` and ``u``."""
        raise NotImplementedError

    # -- Codec ----------------------------------------------------------------------------
    def _buckets(self, numel: int) -> int:
        return -(-numel // self.bucket_size)

    def _body_bytes(self, numel: int) -> int:
        return 4 * self._buckets(numel) + bitpack.packed_bytes(numel, self.bits)

    def _bucket_magnitudes(self, part):
        """``(|x|, scales)``: the bucket-aligned slice's magnitudes as one row per bucket (the
        last padded with zeros) and each bucket's norm."""
        numel, d = part.numel(), self.bucket_size
        x = part.float()
        if numel % d:
            x = torch.nn.functional.pad(x, (0, self._buckets(numel) * d - numel))
        magnitudes = x.abs().view(-1, d)
        return magnitudes, block_norms(magnitudes, self.norm)

    def _divisors(self, part):
        """``(scales, divisors)`` per bucket of a bucket-aligned slice: each bucket's norm,
        and what its magnitudes are divided by before rounding."""
        magnitudes, scales = self._bucket_magnitudes(part)
        # A non-finite bucket keeps its non-finite scale, so it decodes non-finite; its codes
        # only need to be valid integers (NaN and Inf become level 0, overshoot is clamped).
        # Divided by ``scale / unit`` rather than multiplied by its inverse: ``unit / scale``
        # overflows for buckets whose largest value is below ~1e-38, which would all round to
        # zero. Unusable buckets (zero or non-finite scale) divide by inf.
        usable = torch.isfinite(scales) & (scales > 0)
        divisors = torch.where(usable, (scales / self._ratio_unit).clamp_(min=_SMALLEST_FP32),
                               torch.full_like(scales, math.inf))
        return scales, divisors

    def _codes(self, values, divisors, uniforms, dtype=torch.uint8):
        """Codes (``dtype``) of ``values``, given each one's divisor (broadcast) and a uniform
        in [1, 2) per value."""
        scaled = values.float().abs() / divisors
        # NaN and Inf to level 0 (a compare and a select: nan_to_num compiles to a scalar loop)
        scaled = torch.where(scaled < math.inf, scaled, 0.0)
        return self._round(scaled, uniforms).copysign_(values).add_(self.levels).to(dtype)

    def _quantize(self, part, uniforms):
        """Scales (one per bucket) and unpacked uint8 codes of a bucket-aligned slice."""
        scales, divisors = self._divisors(part)
        numel, d = part.numel(), self.bucket_size
        whole = numel // d * d
        codes = torch.empty(numel, dtype=torch.uint8, device=part.device)
        codes[:whole].view(-1, d).copy_(self._codes(
            part[:whole].view(-1, d), divisors[: whole // d].unsqueeze(1), uniforms[:whole].view(-1, d)))
        if whole < numel:
            codes[whole:] = self._codes(part[whole:], divisors[-1], uniforms[whole:])
        return scales, codes

    def _rounding_variance(self, ratio: torch.Tensor) -> torch.Tensor:
        """``(hi - r)(r - lo)`` for each ratio ``r`` in [0, 1] (may overwrite ``ratio``), where
        ``lo <= r <= hi`` are its neighbouring magnitudes: the variance of its rounding, in
        units of the scale squared."""
        raise NotImplementedError

    def _sq_error(self, flat):
        """Each value rounds between its two neighbouring magnitudes, with variance
        :meth:`_rounding_variance` times its bucket's scale squared."""
        if flat.numel() == 0:
            return torch.zeros((), device=flat.device)
        magnitudes, scales = self._bucket_magnitudes(flat.reshape(-1))
        safe = torch.where(torch.isfinite(scales) & (scales > 0), scales, torch.ones_like(scales))
        ratio = magnitudes.div_(safe.unsqueeze(1)).clamp_(0, 1)
        variance = self._rounding_variance(ratio)
        variance.view(-1)[flat.numel():] = 0  # the last bucket's padding is not sent
        weight = torch.where(scales == 0, 0.0, safe * safe)  # an all-zero bucket is exact
        return variance.sum(1).mul(weight).sum()

    def _chunk_align(self) -> int:
        """Eager chunks start at whole buckets and whole tiles of the packed layout."""
        return math.lcm(self.bucket_size, bitpack.tile_values(self.bits))

    def _encode_body(self, flat, generator, out):
        d, bits = self.bucket_size, self.bits
        nb = self._buckets(flat.numel())
        scales_out, packed_out = out[: 4 * nb].view(torch.float32), out[4 * nb:]
        done = flat.numel() // d * d  # whole buckets: one fused kernel, the rest eagerly
        scales = None
        if self._fused() and kernels.usable(flat.device, done):
            # tiles as the kernel's first dimension, in and out: sizes tied, so nothing spills
            rows, lanes = self._kernel_rows(), bitpack.LANES
            scales = kernels.run(("encode", repr(self), flat.device.type), self._fused_encoder,
                                 flat[:done].view(-1, rows, lanes), kernels.draw_key(generator, flat.device),
                                 packed_out[: done * bits // 8].view(-1, rows * lanes * bits // 8))
        if scales is None:
            done = 0
        else:
            scales_out[: done // d] = scales
        for lo, hi in chunk_ranges(flat.numel(), self._chunk_align(), flat.device, first=done):
            scales, codes = self._quantize(flat[lo:hi], uniform_1_2(hi - lo, flat.device, generator))
            scales_out[lo // d: lo // d + scales.numel()] = scales
            packed_out[lo * bits // 8: lo * bits // 8 + bitpack.packed_bytes(hi - lo, bits)] = \
                bitpack.pack_tiled(codes, bits)

    def _table(self, device: torch.device) -> torch.Tensor:
        """:meth:`_fractions` of every code, for lookups."""
        table = self._tables.get(device)
        if table is None:
            codes = torch.arange(2 ** self.bits, dtype=torch.float32)
            table = self._tables[device] = self._fractions(codes).to(device)
        return table

    def _byte_table(self, device: torch.device) -> torch.Tensor:
        """For widths dividing 8: byte -> the ``8 // bits`` fractions of the codes it packs,
        so decoding is one lookup per byte, with no unpacking pass."""
        key = (device, "bytes")
        table = self._tables.get(key)
        if table is None:
            per_byte = 8 // self.bits
            codes = bitpack.unpack(torch.arange(256, dtype=torch.uint8), 256 * per_byte, self.bits)
            fractions = self._table(torch.device("cpu"))[codes.long()].view(256, per_byte)
            table = self._tables[key] = fractions.to(device)
        return table

    def _lookup(self, packed: torch.Tensor, n: int, out: torch.Tensor) -> None:
        """``out[:n]`` = the fractions of the first ``n`` codes in ``packed``
        (:func:`bitpack.pack_tiled`'s layout)."""
        per_byte = 8 // self.bits if 8 % self.bits == 0 else 0
        if per_byte == 1:
            torch.index_select(self._table(packed.device), 0, packed.to(torch.int32), out=out[:n])
        elif per_byte:
            rows = torch.index_select(self._byte_table(packed.device), 0, packed.to(torch.int32))
            whole = n // (per_byte * bitpack.LANES) * (per_byte * bitpack.LANES)
            tiles = rows[: whole // per_byte].view(-1, bitpack.LANES, per_byte)
            out[:whole].view(-1, per_byte, bitpack.LANES).copy_(tiles.transpose(1, 2))
            out[whole:n] = rows[whole // per_byte:].reshape(-1)[: n - whole]
        else:
            codes = bitpack.unpack_tiled(packed, n, self.bits)
            torch.index_select(self._table(packed.device), 0, codes.to(torch.int32), out=out[:n])

    def _body_parts(self, body, numel):
        """``(scales, packed)`` of a body of ``numel`` values: one fp32 per bucket, then codes."""
        nb = self._buckets(numel)
        return aligned(body[: 4 * nb], 4).view(torch.float32), body[4 * nb:]

    def _decode_body(self, body, out, alpha=None):
        d, bits, numel = self.bucket_size, self.bits, out.numel()
        scales, packed = self._body_parts(body, numel)
        done = numel // d * d
        tile = bitpack.tile_values(bits)
        if not (self._fused() and kernels.usable(body.device, done) and kernels.run(
                ("decode", repr(self), body.device.type, alpha is None), self._fused_decoder,
                scales[: done // d].clone(), packed[: done * bits // 8].view(-1, tile * bits // 8),
                out[:done].view(-1, tile), alpha) is not None):
            done = 0
        self._decode_from(body, out, done, alpha)

    def _decode_from(self, body, out, first, alpha=None):
        """The eager decoder, from value ``first`` (a multiple of the bucket size) on."""
        d, bits, numel = self.bucket_size, self.bits, out.numel()
        scales, packed = self._body_parts(body, numel)
        for lo, hi in chunk_ranges(numel, self._chunk_align(), body.device, first=first):
            n, nbytes = hi - lo, bitpack.packed_bytes(hi - lo, bits)
            values = torch.empty(-(-n // d) * d, dtype=torch.float32, device=body.device)
            self._lookup(packed[lo * bits // 8: lo * bits // 8 + nbytes], n, values)
            values[n:] = 0
            values.view(-1, d).mul_(scales[lo // d: lo // d + values.numel() // d].unsqueeze(1))
            self._store(values[:n], out[lo:hi], alpha)

    def _params(self):
        return (self.levels, _NORMS[self.norm], self.bucket_size)
