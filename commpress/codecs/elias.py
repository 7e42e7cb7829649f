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

Two coders write and read these bytes. On the CPU, a native serial one (:mod:`.native`,
``elias_coder.cpp``: each code's bits written once, the unary lengths read as the set bits of
whole words, ranges of values on several threads), 3-10x faster here; elsewhere, and where it cannot
be built, the vectorised torch coder below (prefix sums of the lengths place every field; the
same source compiles to Triton on a GPU), which is the reference: both give the same bytes,
the same values and the same refusals (``tests/test_native_coder.py``).
"""
from __future__ import annotations

import math
import struct
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from . import kernels, native
from .base import chunk_ranges
from .registry import register_codec
from .bucketed import BucketedLevelCodec, aligned, uniform_1_2
from .qsgd import EvenLevels

_PREFIX = struct.Struct("<qqq")
#: ``sum(floor(log2 gap))`` over ``m`` gaps adding up to at most ``n`` is at most
#: ``m log2(n / m) <= n / (e ln 2)``: this fraction of ``n``, rounded up
_GAP_BITS_PER_VALUE = 0.531
#: the longest gap code's ``k``: a record (gap bits, sign, level bits <= 6) fits 63 bits
_MAX_GAP_LOG2 = 56
_INT64_MAX = (1 << 63) - 1


def _stated_sizes(body: torch.Tensor):
    """``(nnz, len_bits, rest_bits)`` from a body's prefix (a host read)."""
    return _PREFIX.unpack(bytes(body[: _PREFIX.size].cpu().numpy()))


def _floor_log2(values: torch.Tensor) -> torch.Tensor:
    """``floor(log2 v)`` of positive int64 values, exactly: a branch-free binary search (one
    fused loop when compiled)."""
    k = torch.zeros_like(values)
    for step in (32, 16, 8, 4, 2, 1):
        above = (values >> step) > 0
        k = k + above.long() * step
        values = torch.where(above, values >> step, values)
    return k


def _power_of_two(k: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(k) << k


def _shifted_right(words: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``words >>> shift``, zeros shifted in, for shifts in ``1..64`` (every shift done by
    the hardware stays in 0..63)."""
    return ((words >> 1) & _INT64_MAX) >> (shift - 1)


def _previous(values: torch.Tensor) -> torch.Tensor:
    """``values`` shifted one place right, -1 first (for differences with a start at -1)."""
    return torch.cat([values.new_full((1,), -1), values[:-1]])


def _records(position: torch.Tensor, signed: torch.Tensor, levels: int):
    """Per non-zero: ``(record, its width, the end of each record, the end of each unary
    length)`` in bits, ends as running sums from 0 (see the module docstring)."""
    gap = position - _previous(position)
    gap_k = _floor_log2(gap)
    record = ((gap - _power_of_two(gap_k)) << 1) | (signed < 0).long()
    widths = gap_k + 1
    lengths = gap_k
    if levels > 1:
        level = signed.abs()
        level_k = _floor_log2(level)
        record = (record << level_k) | (level - _power_of_two(level_k))
        widths = widths + level_k
        lengths = torch.stack([gap_k, level_k], 1).view(-1)
    return record, widths, torch.cumsum(widths, 0), torch.cumsum(lengths + 1, 0)


def _write_fields(values: torch.Tensor, widths: torch.Tensor, ends: torch.Tensor,
                  words: torch.Tensor) -> torch.Tensor:
    """``words`` (zeroed 64-bit words, as many as the fields need and one more) with each
    ``values[i]`` written in ``widths[i]`` (1..63) bits ending at bit ``ends[i]``, most
    significant bit first. A field adds its share to at most two words; as fields do not
    overlap, the integer sums are their OR, whatever order they are added in (the same bits
    on every device, atomics included)."""
    offsets = ends - widths
    word, start = offsets >> 6, offsets & 63
    end = start + widths  # in 1..126 of the two words
    high = torch.where(end <= 64, values << (64 - end).clamp(0, 63),
                       values >> (end - 64).clamp(0, 63))
    low = torch.where(end > 64, values << (128 - end).clamp(0, 63), torch.zeros_like(values))
    words.index_add_(0, word, high)
    words.index_add_(0, word + 1, low)
    return words


def _packed(bits: torch.Tensor) -> torch.Tensor:
    """Bytes of 8 bits each (``bits``: ``(bytes, 8)`` of 0 and 1), most significant first; an
    unrolled OR (a sum over the 8 compiled to a loop ten times slower)."""
    out = bits[:, 0] << 7
    for j in range(1, 8):
        out = out | (bits[:, j] << (7 - j))
    return out


def _unary_stream(ends: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The bytes of zeroed ``bits`` (one uint8 per bit, a multiple of 8) with a one at each
    ``ends[i] - 1``, most significant bit first: the unary lengths."""
    bits[ends - 1] = 1
    return _packed(bits.view(-1, 8))


def _lengths(ends: torch.Tensor, levels: int):
    """``(gap k, level k, record widths, record ends)`` from the ends of the unary lengths."""
    lengths = ends - _previous(ends) - 1
    gap_k = lengths if levels == 1 else lengths[0::2]
    level_k = torch.zeros_like(gap_k) if levels == 1 else lengths[1::2]
    widths = gap_k + 1 + level_k
    return gap_k, level_k, widths, torch.cumsum(widths, 0)


def _read_records(words: torch.Tensor, gap_k: torch.Tensor, level_k: torch.Tensor,
                  widths: torch.Tensor, ends: torch.Tensor, levels: int):
    """``(positions, signed levels)`` of records checked to lie inside ``words``."""
    offsets = ends - widths
    word, start = offsets >> 6, offsets & 63
    top = (words[word] << start) | _shifted_right(words[word + 1], 64 - start)
    record = _shifted_right(top, 64 - widths)
    level = (record & (_power_of_two(level_k) - 1)) | _power_of_two(level_k) if levels > 1 \
        else torch.ones_like(record)
    negative = ((record >> level_k) & 1).bool()
    gap = (record >> (level_k + 1)) | _power_of_two(gap_k)
    return torch.cumsum(gap, 0) - 1, torch.where(negative, -level, level)


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    return words.view(torch.uint8).view(-1, 8).flip(1).reshape(-1)


def _bytes_to_words(section: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_words_to_bytes`, zero-padded by one word so that a field's
    second word always exists."""
    padded = torch.zeros((section.numel() // 8 + 2) * 8, dtype=torch.uint8, device=section.device)
    padded[: section.numel()] = section
    return padded.view(-1, 8).flip(1).contiguous().view(torch.int64).view(-1)


_BIT_TABLES = {}


def _bit_tables(device: torch.device):
    """Per byte value: how many bits are set, and their offsets, most significant first."""
    tables = _BIT_TABLES.get(device)
    if tables is None:
        offsets = [[j for j in range(8) if value >> (7 - j) & 1] for value in range(256)]
        counts = torch.tensor([len(o) for o in offsets], dtype=torch.int64)
        select = torch.tensor([o + [0] * (8 - len(o)) for o in offsets], dtype=torch.int64)
        tables = _BIT_TABLES[device] = (counts.to(device), select.view(-1).to(device))
    return tables


def _set_bits(section: torch.Tensor, ones: int) -> torch.Tensor:
    """Positions (ascending) of the ``ones`` set bits of the bytes ``section``, most
    significant bit first. On the CPU numpy's unpacking and scan of a boolean array (3 ms for
    4M bits on one core, where ``torch.nonzero`` takes 17-29 ms); elsewhere
    :func:`_set_bits_torch`."""
    if section.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(np.unpackbits(section.numpy()).view(np.bool_)))
    return _set_bits_torch(section, ones)


def _set_bits_torch(section: torch.Tensor, ones: int) -> torch.Tensor:
    """:func:`_set_bits` in torch operations. Sparse bits: the non-zero bytes found first (an
    eighth of the bits to scan), then each one's bits from tables; dense ones (an eighth or
    more): unpacked and scanned, cheaper than a table lookup per bit."""
    if ones >= section.numel():
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=section.device)
        return ((section.unsqueeze(1) >> shifts) & 1).view(-1).nonzero().view(-1)
    counts_of, select = _bit_tables(section.device)
    index = section.nonzero().view(-1)
    values = section[index].long()
    counts = counts_of[values]
    total = int(counts.sum()) if counts.numel() else 0
    # each bit's byte: a one where each byte's bits begin (every byte has some), summed up
    # (repeat_interleave costs milliseconds even on a few values: it wakes a thread pool)
    starts = torch.cumsum(counts, 0) - counts
    marks = torch.zeros(total, dtype=torch.int64, device=section.device)
    marks[starts[1:]] = 1
    owner = torch.cumsum(marks, 0)
    rank = torch.arange(total, device=section.device) - starts[owner]
    return index[owner] * 8 + select[values[owner] * 8 + rank]


def _flags(codes: torch.Tensor, levels: int):
    """``(flags, count)``: one bit per code (a multiple of 8 of them), set where it is not the
    zero level's (``levels``), packed into bytes most significant bit first, and how many."""
    nonzero = (codes != levels).view(-1, 8).to(torch.uint8)
    return _packed(nonzero), nonzero.sum(dtype=torch.int64)


class _Sections(NamedTuple):
    """A body's parts: the three stated sizes, the scales and the two streams."""
    nnz: int
    length_bits: int
    rest_bits: int
    scales: torch.Tensor
    lengths: torch.Tensor
    rests: torch.Tensor


def _run(key, fn, numel: int, *args):
    """``fn(*args)``, compiled (:func:`kernels.run`) when a payload of ``numel`` values is worth
    it; eagerly for fewer than two non-zeros (sizes 0 and 1 would each compile anew)."""
    result = None
    if args[0].numel() > 1 and kernels.usable(args[0].device, numel):
        result = kernels.run(key, lambda: fn, *args)
    return fn(*args) if result is None else result


@register_codec("qsgd-elias")
class EliasQSGD(EvenLevels, BucketedLevelCodec):
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

    # -- sizes ----------------------------------------------------------------------------
    @property
    def _codes_per_value(self) -> int:
        """Gamma codes per non-zero: the gap's, and the level's unless ``s = 1``."""
        return 1 if self.levels == 1 else 2

    @property
    def _level_log2(self) -> int:
        return self.levels.bit_length() - 1

    def _stream_bounds(self, numel: int):
        """The most bits the two streams can take for ``numel`` values."""
        level_bits = self._level_log2
        gap_bits = math.ceil(_GAP_BITS_PER_VALUE * numel)
        lengths = gap_bits + numel * self._codes_per_value + (numel * level_bits if self.levels > 1 else 0)
        rests = gap_bits + numel * (1 + level_bits)
        return lengths, rests

    def _body_bytes(self, numel: int) -> int:
        lengths, rests = self._stream_bounds(numel)
        return _PREFIX.size + 4 * self._buckets(numel) + -(-lengths // 8) + -(-rests // 8)

    def _stated_streams(self, body: torch.Tensor, numel: int) -> Tuple[int, int, int, int]:
        """``(nnz, length_bits, rest_bits, body bytes)`` as the body's prefix states them (a
        host read), refused where impossible for ``numel`` values."""
        if body.numel() < _PREFIX.size:
            raise ValueError(f"payload truncated: its {body.numel()}-byte body is shorter than "
                             f"the {_PREFIX.size}-byte size prefix")
        nnz, length_bits, rest_bits = _stated_sizes(body)
        max_lengths, max_rests = self._stream_bounds(numel)
        if not (0 <= nnz <= numel and nnz * self._codes_per_value <= length_bits <= max_lengths
                and nnz <= rest_bits <= max_rests and (nnz > 0 or length_bits == rest_bits == 0)):
            raise ValueError(f"payload states impossible sizes for {numel} values: {nnz} "
                             f"non-zeros in {length_bits} + {rest_bits} bits")
        stated = _PREFIX.size + 4 * self._buckets(numel) + -(-length_bits // 8) + -(-rest_bits // 8)
        return nnz, length_bits, rest_bits, stated

    def _stated_body_bytes(self, body: torch.Tensor, numel: int) -> int:
        return self._stated_streams(body, numel)[3]

    @property
    def short_name(self) -> str:
        return f"elias{self.levels}" + ("" if self.norm == "l2" else "-max")

    def _kernel(self, fn):
        """``fn`` with this codec's ``levels`` bound, as a function of its own (to compile)."""
        levels = self.levels

        def bound(*args):
            return fn(*args, levels=levels)
        return bound

    # -- encode ---------------------------------------------------------------------------
    def _codes_kernel(self):
        """Scales and unpacked codes of whole buckets in one compiled pass, uniforms hashed
        from a key (:func:`kernels.hashed_uniforms`, two per hash: a bucket's two halves)."""
        half = self.bucket_size // 2

        def codes(buckets, key, codes_out):
            scales, divisors = self._divisors(buckets.view(-1))
            uniforms = kernels.hashed_uniforms(key, buckets.shape[0] * half, 2, buckets.device)
            halves = buckets.view(-1, 2, half)
            parts = [self._codes(halves[:, k, :], divisors.unsqueeze(1), uniforms[k].view(-1, half))
                     for k in range(2)]  # stacked, then one store: 5x faster than two strided
            codes_out.copy_(torch.stack(parts, 1).view(codes_out.shape))
            return scales
        return codes

    def _encode_sized_body(self, flat: torch.Tensor, generator: Optional[torch.Generator],
                           room: int = 0) -> torch.Tensor:
        numel, device, d = flat.numel(), flat.device, self.bucket_size
        at = room + _PREFIX.size + 4 * self._buckets(numel)  # where the streams start
        coder = native.library() if device.type == "cpu" else None
        # the native coder writes its streams in place, after the scales (4-byte aligned)
        data = torch.empty(at + 2 * self._stream_capacity(numel) if coder else at,
                           dtype=torch.uint8, device=device)
        scales = data[room + _PREFIX.size: at].view(torch.float32)
        codes = torch.empty(-(-numel // 8) * 8, dtype=torch.uint8, device=device)
        done = numel // d * d  # whole buckets: one compiled pass; the rest eagerly
        fused = None
        if d % 2 == 0 and kernels.usable(device, done):
            fused = kernels.run(("elias-codes", repr(self), device.type), self._codes_kernel,
                                flat[:done].view(-1, d), kernels.draw_key(generator, device),
                                codes[:done].view(-1, d))
        if fused is None:
            done = 0
        else:
            scales[: done // d] = fused
        codes[numel:] = self.levels  # zero codes past the end
        for lo, hi in chunk_ranges(numel, d, device, first=done):
            part_scales, codes[lo:hi] = self._quantize(flat[lo:hi], uniform_1_2(hi - lo, device, generator))
            scales[lo // d: lo // d + part_scales.numel()] = part_scales
        if coder is not None:
            nnz, length_bits, rest_bits = self._native_streams(coder, codes, numel, data[at:])
            data = data[: at + -(-length_bits // 8) + -(-rest_bits // 8)]
        else:
            nnz, length_bits, rest_bits, streams = self._vectorised_streams(codes, numel)
            data = torch.cat([data, *streams])
        data[room: room + _PREFIX.size] = torch.frombuffer(
            bytearray(_PREFIX.pack(nnz, length_bits, rest_bits)), dtype=torch.uint8).to(device)
        return data

    def _stream_capacity(self, numel: int) -> int:
        """Bytes the native coder needs for either stream (its bound and words to spare)."""
        return -(-max(self._stream_bounds(numel)) // 8) + 32

    def _native_streams(self, coder, codes: torch.Tensor, numel: int, out: torch.Tensor):
        """``(nnz, length bits, rest bits)``: the two streams of the codes written to ``out``
        (twice :meth:`_stream_capacity` bytes), the length stream's bytes then the rest
        stream's, by the serial coder (:mod:`.native`) on up to ``torch.get_num_threads()``
        threads."""
        sizes = torch.empty(3, dtype=torch.int64)
        coder.commpress_elias_encode(codes.data_ptr(), numel, self.levels, out.data_ptr(),
                                     self._stream_capacity(numel), torch.get_num_threads(),
                                     native.THREAD_CODES, sizes.data_ptr())
        nnz, length_bits, rest_bits = sizes.tolist()
        if nnz == -2:
            raise MemoryError(f"{self!r}: no scratch space to encode {numel} values")
        if min(length_bits, rest_bits) < 0:
            raise RuntimeError(f"{self!r}: streams past their bound for {numel} values")
        return nnz, length_bits, rest_bits

    def _vectorised_streams(self, codes: torch.Tensor, numel: int):
        """``(nnz, length bits, rest bits, [lengths, rests])`` of the codes in torch operations
        (any device; the native coder's reference): the positions of the non-zero codes, their
        records and the two prefix sums of their widths, then every field written at once."""
        device = codes.device
        flags, count = _run(("elias-flags", self.levels, device.type), self._kernel(_flags), numel,
                            codes)
        position = _set_bits(flags, int(count))
        signed = codes[position].long() - self.levels
        record, widths, record_ends, length_ends = _run(
            ("elias-records", repr(self), device.type), self._kernel(_records), numel, position, signed)
        length_bits, rest_bits = (int(ends[-1]) if ends.numel() else 0
                                  for ends in (length_ends, record_ends))
        unary = torch.zeros(-(-length_bits // 8) * 8, dtype=torch.uint8, device=device)
        if length_ends.numel():
            unary = _run(("elias-unary", device.type), _unary_stream, numel, length_ends, unary)
        words = torch.zeros(rest_bits // 64 + 2, dtype=torch.int64, device=device)
        if record.numel():
            words = _run(("elias-write", device.type), _write_fields, numel, record, widths,
                         record_ends, words)
        return position.numel(), length_bits, rest_bits, [
            unary[: -(-length_bits // 8)], _words_to_bytes(words)[: -(-rest_bits // 8)]]

    # -- decode ---------------------------------------------------------------------------
    def _sections(self, body: torch.Tensor, numel: int) -> "_Sections":
        """The body's parts, refused where its length contradicts its prefix."""
        nnz, length_bits, rest_bits, stated = self._stated_streams(body, numel)
        if body.numel() != stated:
            raise ValueError(f"payload's body is {body.numel()} bytes, its prefix states {stated}")
        at = _PREFIX.size + 4 * self._buckets(numel)
        scales = aligned(body[_PREFIX.size: at], 4).view(torch.float32)
        lengths = body[at: at + -(-length_bits // 8)]
        return _Sections(nnz, length_bits, rest_bits, scales, lengths, body[at + lengths.numel():])

    def _sparse_levels(self, body: torch.Tensor, numel: int):
        """``(scales, positions, signed levels, whether every scale is finite)`` of a body;
        raises ``ValueError`` on a length or streams that contradict its prefix, before
        reading past them."""
        sections = self._sections(body, numel)
        coder = native.library() if body.device.type == "cpu" else None
        if coder is not None:
            position, signed = self._read_natively(coder, sections, numel)
            return sections.scales, position, signed, bool(torch.isfinite(sections.scales).all())
        return self._read_vectorised(sections, numel)

    def _read_natively(self, coder, sections: "_Sections", numel: int,
                       out: Optional[torch.Tensor] = None, alpha: Optional[float] = None):
        """The serial decoder (:mod:`.native`): ``(positions, signed levels)``, or with an fp32
        ``out`` (contiguous, every scale finite), the values written into it (added times
        ``alpha`` with one) as :meth:`_decode_body` writes them. On a malformed payload it
        raises ``ValueError``, ``out`` partly written."""
        nnz, length_bits, rest_bits = sections.nnz, sections.length_bits, sections.rest_bits
        lengths, rests = sections.lengths.contiguous(), sections.rests.contiguous()
        scales = sections.scales.contiguous()
        magnitudes = self._table(torch.device("cpu"))  # by code: levels + signed level
        if out is None:
            position, signed = (torch.empty(nnz, dtype=torch.int64) for _ in range(2))
            mode, target = 0, 0
        else:
            position = signed = torch.empty(0, dtype=torch.int64)
            mode, target = (1 if alpha is None else 2), out.data_ptr()
        error = coder.commpress_elias_decode(
            lengths.data_ptr(), length_bits, rests.data_ptr(), rest_bits, nnz, self.levels, numel,
            self.bucket_size, magnitudes.data_ptr(), scales.data_ptr(), target, mode,
            1.0 if alpha is None else alpha, position.data_ptr(), signed.data_ptr(),
            torch.get_num_threads(), native.THREAD_CODES)
        if error == 1:
            raise ValueError(f"payload's length stream does not hold the "
                             f"{nnz * self._codes_per_value} codes it states in {length_bits} bits")
        if error == 2:
            raise ValueError(f"payload's records do not fill the {rest_bits} bits it states with "
                             f"codes of {self!r}")
        if error == 3:
            raise ValueError(f"payload holds a level above {self.levels} or a non-zero past "
                             f"position {numel - 1}")
        if error == 4:
            raise MemoryError(f"{self!r}: no scratch space to decode {nnz} non-zeros")
        return position, signed

    def _read_vectorised(self, sections: "_Sections", numel: int):
        """:meth:`_sparse_levels` in torch operations (any device)."""
        nnz, length_bits, rest_bits, scales = sections[:4]
        # (a forged stream with more ones, or ones past length_bits, is refused just below)
        ends = _set_bits(sections.lengths, nnz * self._codes_per_value)
        if ends.numel() != nnz * self._codes_per_value or (nnz and int(ends[-1]) != length_bits - 1):
            raise ValueError(f"payload's length stream holds {ends.numel()} codes in "
                             f"{length_bits} bits, not the {nnz * self._codes_per_value} it states")
        if not nnz:
            empty = torch.zeros(0, dtype=torch.int64, device=scales.device)
            return scales, empty, empty, bool(torch.isfinite(scales).all())
        key, device = repr(self), scales.device.type
        gap_k, level_k, widths, record_ends = _run(
            ("elias-lengths", key, device), self._kernel(_lengths), numel, ends)
        longest_gap, longest_level, total = torch.stack(
            [gap_k.max(), level_k.max(), record_ends[-1]]).tolist()
        if longest_gap > _MAX_GAP_LOG2 or longest_level > self._level_log2 or total != rest_bits:
            raise ValueError(f"payload's records take {total} bits (it states {rest_bits}), with "
                             f"codes of up to 2^{longest_gap} and 2^{longest_level}: not a "
                             f"payload of {self!r}")
        position, signed = _run(("elias-read", key, device), self._kernel(_read_records),
                                numel, _bytes_to_words(sections.rests), gap_k, level_k, widths,
                                record_ends)
        largest, last, finite = torch.stack([signed.abs().max(), position[-1],
                                             torch.isfinite(scales).all()]).tolist()
        if largest > self.levels or last >= numel:
            raise ValueError(f"payload holds a level of {largest} (at most {self.levels}) or a "
                             f"non-zero at position {last} of {numel}")
        return scales, position, signed, bool(finite)

    def _decode_body(self, body, out, alpha=None):
        numel, d = out.numel(), self.bucket_size
        coder = native.library() if body.device.type == "cpu" else None
        if coder is not None and out.dtype == torch.float32 and out.is_contiguous():
            sections = self._sections(body, numel)
            if bool(torch.isfinite(sections.scales).all()):  # straight into out, in one pass
                self._read_natively(coder, sections, numel, out, alpha)
                return
        scales, position, signed, finite = self._sparse_levels(body, numel)
        if finite:  # the non-zeros scattered into out: no full-size temporary, nothing to add
            values = self._level_magnitudes(signed.float()) * scales[position // d]
            if alpha is None:
                out.zero_()
                out[position] = values.to(out.dtype)
            else:  # as _store adds: the product rounded, then the sum
                out.index_add_(0, position, values * alpha)
            return
        # a non-finite scale makes its whole bucket non-finite, zeros included (0 * inf)
        values = torch.zeros(self._buckets(numel) * d, dtype=torch.float32, device=out.device)
        values[position] = self._level_magnitudes(signed.float())
        values.view(-1, d).mul_(scales.unsqueeze(1))
        self._store(values[:numel], out, alpha)

    def _decode_mean_body(self, bodies, out, local, rank) -> int:
        return 0  # no fused kernel: each payload is decoded sparsely

    def _decode_from(self, body, out, first, alpha=None):
        if first:
            raise NotImplementedError(f"{type(self).__name__} decodes whole payloads only")
        self._decode_body(body, out, alpha)

    def __repr__(self):
        return f"EliasQSGD(levels={self.levels}, bucket_size={self.bucket_size}, norm={self.norm!r})"

