"""QSGD with the paper's variable-length coding: only the non-zero levels are sent, each as
the Elias gamma code of its gap from the previous one, a sign bit and the Elias gamma code of
its level.

With L2-scaled buckets and few levels most values round to zero (at most ``s(s + sqrt(d))``
non-zeros per bucket of ``d``), so the gaps are long and a payload is a fraction of a bit per
value: about 0.4 bits at ``s = 1`` on Gaussian data where fixed-width QSGD needs 2 bits.

Body layout (after the common header), little endian::

    nnz (int64) | len_bits (int64) | rest_bits (int64) | scales (fp32 per bucket)
    | lengths (len_bits, bytes rounded up) | rests (rest_bits, bytes rounded up)

The gamma code of ``v >= 1`` is ``k = floor(log2 v)`` zeros, then ``v`` in ``k + 1`` bits. Its
two halves go to two streams, so that both decode in parallel (no serial bit reader):

- ``lengths``: per non-zero, ``k`` of the gap in unary (``k`` zeros, then a one), then ``k`` of
  the level the same way (left out when ``s = 1``: every level is 1). The ones mark where
  each code ends, so all lengths are one ``nonzero`` and one ``diff`` away.
- ``rests``: per non-zero, one record: the gap's low ``k`` bits, the sign (1: negative), the
  level's low ``k`` bits (their leading one is implied). Record offsets are a prefix sum of
  the lengths; records are written as 64-bit words, most significant bit first.

Gaps run across bucket boundaries (position ``i`` of the payload, not of its bucket), so no
per-bucket counts are needed. The payload states its own length (the three counts), which a
forged one cannot push past :meth:`Codec.wire_bytes`, the bound for its element count.
"""
from __future__ import annotations

import math
import struct
from typing import Optional

import torch

from .base import chunk_ranges, register_codec
from .bucketed import BucketedLevelCodec, aligned, uniform_1_2

_PREFIX = struct.Struct("<qqq")
#: ``sum(floor(log2 gap))`` over ``m`` gaps adding up to at most ``n`` is at most
#: ``m log2(n / m) <= n / (e ln 2)``: this fraction of ``n``, rounded up
_GAP_BITS_PER_VALUE = 0.531
_MAX_RECORD_BITS = 63  # a record must fit a 64-bit word
_INT64_MAX = (1 << 63) - 1


def _floor_log2(values: torch.Tensor) -> torch.Tensor:
    """``floor(log2 v)`` of positive int64 values below 2**53, exactly (frexp of a double)."""
    return torch.frexp(values.double()).exponent.to(torch.int64) - 1


def _logical_shift_right(words: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``words >>> shift`` for shifts in ``1..64`` (zeros shifted in, 0 for 64)."""
    return ((words >> 1) & _INT64_MAX) >> (shift - 1)


def _write_fields(values: torch.Tensor, widths: torch.Tensor, offsets: torch.Tensor,
                  nbits: int) -> torch.Tensor:
    """``nbits`` bits (as bytes) holding each ``values[i]`` in ``widths[i] <= 63`` bits at bit
    ``offsets[i]``, most significant bit first; the fields do not overlap. Each field adds its
    share to at most two 64-bit words; as the bits are disjoint, the sum is their OR (in any
    order: deterministic on every device)."""
    words = torch.zeros(nbits // 64 + 2, dtype=torch.int64, device=values.device)
    if values.numel():
        word, start = offsets >> 6, offsets & 63
        end = start + widths  # in 0..127 of the two words
        high = torch.where(end <= 64, values << (64 - end).clamp(min=0),
                           values >> (end - 64).clamp(min=0))
        low = values << (128 - end)  # shifts of 64 or more give 0: nothing spills over
        words.index_add_(0, word, high)
        words.index_add_(0, word + 1, low)
    return _words_to_bytes(words)[: -(-nbits // 8)]


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    return words.view(torch.uint8).view(-1, 8).flip(1).reshape(-1)


def _bytes_to_words(section: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_words_to_bytes`, zero-padded by one word so that a field's
    second word always exists."""
    padded = torch.zeros((section.numel() // 8 + 2) * 8, dtype=torch.uint8, device=section.device)
    padded[: section.numel()] = section
    return padded.view(-1, 8).flip(1).contiguous().view(torch.int64).view(-1)


def _read_fields(words: torch.Tensor, widths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The fields :func:`_write_fields` wrote (widths 0..63)."""
    word, start = offsets >> 6, offsets & 63
    top = (words[word] << start) | _logical_shift_right(words[word + 1], 64 - start)
    return _logical_shift_right(top, 64 - widths)


def _ones_positions(section: torch.Tensor, nbits: int) -> torch.Tensor:
    """Bit positions (most significant first) of the ones among the first ``nbits`` bits."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=section.device)
    bits = (section.unsqueeze(1) >> shifts) & 1
    return bits.view(-1)[:nbits].nonzero().view(-1)


@register_codec("qsgd-elias")
class EliasQSGD(BucketedLevelCodec):
    """QSGD with ``levels`` (the paper's ``s``, any of 1..127) levels per sign, one fp32 scale
    per bucket, and the paper's variable-length coding of the non-zero levels (see the module
    docstring): the quantization of :class:`QSGD`, fewer bits on the wire.

    ``norm="l2"`` (the default here, the paper's analysed variant) makes most levels zero and
    the payload small (the variance bound ``min(d/s^2, sqrt(d)/s)`` per bucket is large for
    small ``s``); ``norm="max"`` gives :class:`QSGD`'s max-norm quantization exactly (the
    ``levels = 2**(bits-1) - 1`` of QSGD-``bits``), entropy-coded.

    The payload's size depends on the data: the collectives exchange sizes before moving
    payloads (one small all-gather per piece), and :meth:`wire_bytes` is the bound.

    Example::

        >>> codec = EliasQSGD(levels=2)
        >>> payload = codec.encode(torch.randn(100_000))
        >>> payload.nbytes < codec.wire_bytes(100_000)
        True
    """

    codec_id = 9
    name = "qsgd-elias"
    variable_length = True

    def __init__(self, levels: int = 1, bucket_size: int = 512, norm: str = "l2"):
        if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= 127:
            raise ValueError(f"EliasQSGD levels must be an integer in 1..127, got {levels!r}")
        super().__init__(8, levels, bucket_size, norm)

    @property
    def feedback_safe(self) -> bool:
        # error feedback needs a relative variance of order 1: max-norm buckets have it (as
        # QSGD's), L2 ones only where the bound min(d/s^2, sqrt(d)/s) is at most 4
        # (s >= 6 for buckets of 512); s = 1 has about 15 on real gradients
        d, s = self.bucket_size, self.levels
        return self.norm == "max" or min(d / s ** 2, math.sqrt(d) / s) <= 4

    # the rounding is QSGD's: evenly spaced levels
    def _level_magnitudes(self, level):
        return level / self.levels

    @property
    def _ratio_unit(self):
        return self.levels

    def _round(self, scaled, u):
        return scaled.add_(u).floor_().sub_(1.0).clamp_(max=self.levels)

    def _rounding_variance(self, ratio):
        t = ratio.mul_(self.levels)
        fraction = t.sub_(torch.floor(t))
        return fraction.mul_(1.0 - fraction).div_(self.levels ** 2)

    # -- sizes ----------------------------------------------------------------------------
    @property
    def _codes_per_value(self) -> int:
        """Gamma codes per non-zero: the gap's, and the level's unless ``s = 1``."""
        return 1 if self.levels == 1 else 2

    def _stream_bounds(self, numel: int):
        """The most bits the two streams can take for ``numel`` values."""
        level_bits = _floor_log2(torch.tensor([self.levels])).item()
        gap_bits = math.ceil(_GAP_BITS_PER_VALUE * numel)
        lengths = gap_bits + numel * self._codes_per_value + (numel * level_bits if self.levels > 1 else 0)
        rests = gap_bits + numel * (1 + level_bits)
        return lengths, rests

    def _body_bytes(self, numel: int) -> int:
        lengths, rests = self._stream_bounds(numel)
        return _PREFIX.size + 4 * self._buckets(numel) + -(-lengths // 8) + -(-rests // 8)

    def _stated_body_bytes(self, body: torch.Tensor, numel: int) -> int:
        if body.numel() < _PREFIX.size:
            raise ValueError(f"payload truncated: its {body.numel()}-byte body is shorter than "
                             f"the {_PREFIX.size}-byte size prefix")
        nnz, length_bits, rest_bits = _PREFIX.unpack(bytes(body[: _PREFIX.size].cpu().numpy()))
        max_lengths, max_rests = self._stream_bounds(numel)
        if not (0 <= nnz <= numel and nnz * self._codes_per_value <= length_bits <= max_lengths
                and nnz <= rest_bits <= max_rests and (nnz > 0 or length_bits == rest_bits == 0)):
            raise ValueError(f"payload states impossible sizes for {numel} values: {nnz} "
                             f"non-zeros in {length_bits} + {rest_bits} bits")
        return (_PREFIX.size + 4 * self._buckets(numel) + -(-length_bits // 8)
                + -(-rest_bits // 8))

    # -- encode ---------------------------------------------------------------------------
    def _encode_sized_body(self, flat: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        numel, device, d = flat.numel(), flat.device, self.bucket_size
        scales = torch.empty(self._buckets(numel), dtype=torch.float32, device=device)
        codes = torch.empty(numel, dtype=torch.uint8, device=device)
        for lo, hi in chunk_ranges(numel, d, device):
            part_scales, codes[lo:hi] = self._quantize(flat[lo:hi], uniform_1_2(hi - lo, device, generator))
            scales[lo // d: lo // d + part_scales.numel()] = part_scales
        position = (codes != self.levels).nonzero().view(-1)
        signed = codes[position].to(torch.int64) - self.levels
        gap = torch.diff(position, prepend=position.new_full((1,), -1))
        gap_k = _floor_log2(gap)
        record = gap - (1 << gap_k)
        record_bits = gap_k + 1
        record = (record << 1) | (signed < 0)
        lengths = gap_k
        if self.levels > 1:
            level = signed.abs()
            level_k = _floor_log2(level)
            record = (record << level_k) | (level - (1 << level_k))
            record_bits = record_bits + level_k
            lengths = torch.stack([gap_k, level_k], 1).view(-1)
        ends = torch.cumsum(lengths + 1, 0)
        length_bits = int(ends[-1]) if ends.numel() else 0
        length_stream = _write_fields(torch.ones_like(ends), torch.ones_like(ends), ends - 1, length_bits)
        record_ends = torch.cumsum(record_bits, 0)
        rest_bits = int(record_ends[-1]) if record_ends.numel() else 0
        rest_stream = _write_fields(record, record_bits, record_ends - record_bits, rest_bits)
        prefix = torch.frombuffer(bytearray(_PREFIX.pack(position.numel(), length_bits, rest_bits)),
                                  dtype=torch.uint8).to(device)
        return torch.cat([prefix, scales.view(torch.uint8), length_stream, rest_stream])

    # -- decode ---------------------------------------------------------------------------
    def _sparse_levels(self, body: torch.Tensor, numel: int):
        """``(scales, positions, signed levels)`` of a length-checked body; raises
        ``ValueError`` on streams that contradict its prefix."""
        nnz, length_bits, rest_bits = _PREFIX.unpack(bytes(body[: _PREFIX.size].cpu().numpy()))
        nb = self._buckets(numel)
        at = _PREFIX.size + 4 * nb
        scales = aligned(body[_PREFIX.size: at], 4).view(torch.float32)
        length_stream = body[at: at + -(-length_bits // 8)]
        rest_stream = body[at + length_stream.numel():]
        ends = _ones_positions(length_stream, length_bits)
        if ends.numel() != nnz * self._codes_per_value or (nnz and int(ends[-1]) != length_bits - 1):
            raise ValueError(f"payload's length stream holds {ends.numel()} codes in "
                             f"{length_bits} bits, not the {nnz * self._codes_per_value} it states")
        lengths = torch.diff(ends, prepend=ends.new_full((1,), -1)) - 1
        if nnz and int(lengths.max()) > 56:
            raise ValueError("payload's length stream holds a gap longer than any payload")
        gap_k = lengths if self.levels == 1 else lengths[0::2]
        level_k = torch.zeros_like(gap_k) if self.levels == 1 else lengths[1::2]
        record_bits = gap_k + 1 + level_k
        record_ends = torch.cumsum(record_bits, 0)
        if (int(record_ends[-1]) if nnz else 0) != rest_bits:
            raise ValueError(f"payload's records take {int(record_ends[-1]) if nnz else 0} bits, "
                             f"not the {rest_bits} it states")
        record = _read_fields(_bytes_to_words(rest_stream), record_bits, record_ends - record_bits)
        level = (record & ((1 << level_k) - 1)) | (1 << level_k) if self.levels > 1 else \
            torch.ones_like(record)
        negative = (record >> level_k) & 1
        gap = (record >> (level_k + 1)) | (1 << gap_k)
        if nnz and (int(gap.max()) > numel or int(level.max()) > self.levels):
            raise ValueError(f"payload holds a gap past its {numel} values or a level above "
                             f"{self.levels}")
        position = torch.cumsum(gap, 0) - 1
        if nnz and int(position[-1]) >= numel:
            raise ValueError(f"payload's non-zeros run past its {numel} values")
        return scales, position, torch.where(negative.bool(), -level, level)

    def _decode_body(self, body, out, alpha=None):
        numel, d = out.numel(), self.bucket_size
        scales, position, signed = self._sparse_levels(body, numel)
        values = torch.zeros(self._buckets(numel) * d, dtype=torch.float32, device=out.device)
        values[position] = self._level_magnitudes(signed.float())
        values.view(-1, d).mul_(scales.unsqueeze(1))  # 0 * a non-finite scale stays non-finite
        self._store(values[:numel], out, alpha)

    def _decode_mean_body(self, bodies, out, local, rank) -> int:
        return 0  # no fused kernel: each payload is decoded sparsely

    def _decode_from(self, body, out, first, alpha=None):
        if first:
            raise NotImplementedError(f"{type(self).__name__} decodes whole payloads only")
        self._decode_body(body, out, alpha)

    def __repr__(self):
        return f"EliasQSGD(levels={self.levels}, bucket_size={self.bucket_size}, norm={self.norm!r})"

