"""Natural compression C_nat and natural dithering D_nat (Horvath et al., 2019)."""
from __future__ import annotations

import math
import sys

import torch

from . import kernels
from .base import Codec, chunk_ranges
from .registry import register_codec
from .fused import FusedMean
from .bucketed import BucketedLevelCodec, aligned, random_bits

# C_nat code byte: bit 7 the sign, bits 0-6 an exponent code.
_ZERO, _INF, _NAN = 0, 127, 0x80
_SPAN = 126  # exponent codes 1..126 cover e_top-125 .. e_top


@register_codec("natural", "cnat")
class NaturalCompression(FusedMean, Codec):
    """C_nat: each value rounds, unbiasedly, to one of the two powers of two around it
    (``E[C(t)] = t``, ``E[C(t)^2] <= 9/8 t^2``). Exactly 8 bits per entry plus one int32
    per payload: a sign bit and a 7-bit exponent offset below ``e_top``, the largest
    exponent the rounding can reach. Values more than 2^125 below the largest one are
    rounded unbiasedly between zero and the smallest representable power. Code 127 is
    +-inf and 0x80 NaN, so non-finite input stays non-finite.

    On fp32 bits the rounding is exact: keep the exponent, and add one to it when a
    uniform 23-bit integer is below the mantissa.

    Example::

        >>> codec = NaturalCompression()
        >>> codec.decode(codec.encode(torch.tensor([2.5, -0.75, 0.0])))  # e.g. [2., -1., 0.]
    """

    codec_id = 5
    name = "natural"
    stochastic = True

    def _body_bytes(self, numel):
        return 4 + numel

    def _sq_error(self, flat):
        """``|x|`` between the powers of two ``lo <= |x| < hi = 2 lo``: ``(hi - |x|)(|x| - lo)``,
        ``lo`` from the exponent's bits (which the compiler fuses; frexp it would not). Below
        the smallest normal fp32 that product is under 2^-253: zero in fp32."""
        a = flat.float().abs()
        lo = (a.view(torch.int32) & 0x7F800000).view(torch.float32)
        return torch.where(a >= 2.0 ** -126, (2 * lo - a) * (a - lo), 0.0).sum()

    def _encode_body(self, flat, generator, out):
        # the kernel writes four codes as one little-endian int32 word: out[4:] must be aligned
        # and its storage whole words (as `encode` allocates it; the compiler asserts so)
        if (kernels.usable(flat.device, flat.numel()) and out.storage_offset() % 4 == 0
                and out.untyped_storage().nbytes() % 4 == 0 and sys.byteorder == "little"):
            key = kernels.draw_key(generator, flat.device, streams=2)
            # The low-range step draws a second hash per value, though it rarely applies (only
            # to values 2^125 below the largest). On the CPU, where reading the kernel's flag
            # costs no sync, the kernel first leaves it out and runs again with it if needed:
            # same key, same codes as the kernel with the step, 20-25% faster.
            low_range = flat.device.type != "cpu"
            fused = self._run_fused_encoder(flat, key, out, low_range)
            if fused is not None and not low_range and bool(fused[1]):
                fused = self._run_fused_encoder(flat, key, out, True)
            if fused is not None:
                e_top = fused[0]
                out[:4] = e_top.reshape(1).view(torch.uint8)
                whole = flat.numel() // 4 * 4  # the last 0-3 values eagerly, from the generator
                tail = flat[whole:].float()
                if tail.numel():
                    out[4 + whole:] = self._codes(tail, e_top, True, lambda stream: random_bits(
                        tail.numel(), flat.device, generator))
                return
        ranges = list(chunk_ranges(flat.numel(), 1, flat.device))
        biggest = torch.zeros((), dtype=torch.int32, device=flat.device)
        for lo, hi in ranges:  # largest finite exponent, without a host sync
            biggest = torch.maximum(biggest, self._largest_exponent(flat[lo:hi].float()))
        e_top = biggest + 1  # rounding up adds at most one
        out[:4] = e_top.reshape(1).view(torch.uint8)
        # Values more than 2^125 below the largest need a second rounding step; on CPU, where
        # looking is free, skip it when no value can be that small.
        low_range = flat.device.type != "cpu" or int(e_top) > _SPAN - 1
        for lo, hi in ranges:
            n = hi - lo
            out[4 + lo: 4 + hi] = self._codes(flat[lo:hi].float(), e_top, low_range,
                                              lambda stream: random_bits(n, flat.device, generator))

    def _run_fused_encoder(self, flat, key, out, low_range):
        """``(e_top, needs_low_range)`` from the kernel, which wrote the codes of the first
        ``numel // 4 * 4`` values, or None."""
        words = out[4: 4 + flat.numel() // 4 * 4].view(torch.int32)
        return kernels.run(("encode", repr(self), flat.device.type, low_range),
                           lambda: self._fused_encoder(low_range), flat, key, words)

    def _fused_encoder(self, low_range):
        """The kernel: the values in columns of four, so that three hashes serve four values
        (:func:`kernels.hashed_bits`), and their codes stored as one int32 word."""
        def encode(flat, key, words_out):
            groups = words_out.shape[0]
            torch._check(flat.shape[0] - 4 * groups >= 0)
            torch._check(flat.shape[0] - 4 * groups < 4)
            x = flat.float()
            e_top = self._largest_exponent(x) + 1
            columns = x[: 4 * groups].view(-1, 4)
            bits = [kernels.hashed_bits(key, groups, x.device, stream) for stream in range(1 + low_range)]
            word = 0
            for k in range(4):  # little-endian: value 4g + k is byte k of word g
                code = self._codes(columns[:, k], e_top, low_range, lambda stream, k=k: bits[stream][k])
                word = word | (code.to(torch.int32) << (8 * k))
            words_out.copy_(word)
            # a nonzero magnitude below 2^(e_low - 127) may round below the range
            magnitude = x.view(torch.int32) & 0x7FFFFFFF
            e_low = (e_top - (_SPAN - 1)).clamp(min=0)
            return e_top, ((magnitude > 0) & (magnitude < (e_low << 23))).any()
        return encode

    @staticmethod
    def _largest_exponent(x):
        """The largest biased exponent among the finite values of fp32 ``x`` (0-d int32)."""
        expo = (x.view(torch.int32) >> 23) & 0xFF
        return expo.masked_fill(expo == 0xFF, 0).amax()

    @staticmethod
    def _code_bytes(expo, negative, e_top):
        """Code byte of each rounded biased exponent ``expo`` (int32, 0..255) and sign: 0 stays
        zero (unsigned), 255 is Inf, the rest count down from ``e_top``. Arithmetic rather than
        a table lookup: compiled, a gather of this kind ran 2.4x slower."""
        low = torch.where(expo == 255, _INF, (expo - e_top + _SPAN).clamp(min=0))
        low = torch.where(expo == 0, 0, low)
        return torch.where(negative & (low != 0), low | 0x80, low)

    @classmethod
    def _codes(cls, x, e_top, low_range, random):
        """Code bytes of fp32 ``x``; ``random(stream)`` gives uniform 23-bit integers (int32),
        one per value, a fresh draw for each ``stream``."""
        bits = x.view(torch.int32)
        magnitude = bits & 0x7FFFFFFF
        nan = magnitude > 0x7F800000
        infinite = magnitude == 0x7F800000
        # C_nat on the bits: a uniform 23-bit integer added to the mantissa carries into the
        # exponent with probability mantissa / 2^23 (a subnormal becomes 2^-126 or zero).
        # fp32 has no 2^128: finite values of the top binade (|x| >= 2^127) stay at 2^127,
        # the one place C_nat is biased (down, by less than 2x); infinities stay infinite.
        expo = magnitude.clamp_(max=0x7F7FFFFF).add_(random(0)) >> 23
        expo = expo.clamp_(max=254).add_(infinite)
        if low_range:
            # below 2^(e_low-127): up to it with probability 2^(expo - e_low), else to zero
            e_low = e_top - (_SPAN - 1)
            below = (expo < e_low) & (expo > 0)
            threshold = (1 << 23) >> (e_low - expo).clamp_(0, 31)
            up = random(1) < threshold
            expo = torch.where(below, up * e_low, expo)
        return cls._code_bytes(expo, bits < 0, e_top).masked_fill_(nan, _NAN).to(torch.uint8)

    @staticmethod
    def _values(codes, e_top):
        """fp32 values of code bytes ``codes`` (int32), arithmetically (the compiled decoder's
        form of :meth:`_decode_body`'s table): code ``low`` is ``2^(e_top - 127 - 126 + low)``,
        its fp32 bits built directly (subnormal or zero where it falls below the normal range),
        the code's sign bit moved to the float's."""
        low = codes & 0x7F
        biased = e_top - _SPAN + low
        normal = biased.clamp(min=0) << 23
        subnormal = torch.where(biased > -23, 1 << (biased + 22).clamp(0, 22), 0)
        magnitude = torch.where(biased >= 1, normal, subnormal)
        magnitude = torch.where(low == _INF, 0x7F800000, torch.where(low == _ZERO, 0, magnitude))
        bits = torch.where(codes == _NAN, 0x7FC00000, magnitude | ((codes & 0x80) << 24))
        return bits.view(torch.float32)

    def _fused_decoder(self):
        def decode(e_top, codes, out, alpha):  # alpha an argument: see the bucketed codecs
            torch._check(out.shape[0] == codes.shape[0])
            self._store(self._values(codes.to(torch.int32), e_top), out, alpha)
            return out
        return decode

    def _mean_kernel_inputs(self, bodies, numel):
        """Each payload's ``e_top`` ``(1, W)`` and its codes, one column per payload."""
        e_tops = bodies[:, :4].contiguous().view(torch.int32).view(1, -1)
        return (e_tops, bodies[:, 4:].t()), numel, numel

    def _payload_values(self, inputs, index):
        e_tops, codes = inputs
        return self._values(codes[:, index].to(torch.int32), e_tops[0, index]).view(-1, 1)

    def _decode_body(self, body, out, alpha=None):
        e_top = aligned(body[:4], 4).view(torch.int32)
        if kernels.usable(body.device, out.numel()) and kernels.run(
                ("decode", repr(self), body.device.type, alpha is None),
                self._fused_decoder, e_top.reshape(()), body[4:], out, alpha) is not None:
            return
        low = torch.arange(128, device=body.device, dtype=torch.int32)
        mags = torch.ldexp(torch.ones(128, device=body.device),
                           (e_top - 127 - _SPAN + low).to(torch.float32))
        mags[_ZERO], mags[_INF] = 0.0, math.inf
        table = torch.cat([mags, -mags])
        table[_NAN] = math.nan
        for lo, hi in chunk_ranges(out.numel(), 1, body.device):
            self._store(torch.index_select(table, 0, body[4 + lo: 4 + hi].to(torch.int32)),
                        out[lo:hi], alpha)


@register_codec("dithering", "dnat")
class NaturalDithering(BucketedLevelCodec):
    """D_nat^{p,s}: ``|x_i| / ||x||_p`` (per bucket) rounds unbiasedly between neighbours of
    ``{0, 2^(1-s), ..., 1/2, 1}``; sign and level take ``1 + ceil(log2(s+1))`` bits
    (the default ``s = 7`` fills 4 bits), plus one fp32 norm per bucket.

    Example::

        >>> codec = NaturalDithering(levels=7, p=float("inf"))
        >>> codec.bits
        4
    """

    codec_id = 6
    name = "dithering"

    def __init__(self, levels: int = 7, p: float = math.inf, bucket_size: int = 512):
        if not isinstance(levels, int) or not 1 <= levels <= 127:
            raise ValueError(f"natural dithering levels must be an integer in 1..127, got {levels!r}")
        if p not in (2, math.inf):
            raise ValueError(f"natural dithering supports p=2 or p=inf, got {p!r}")
        self.p = p
        bits = 1 + math.ceil(math.log2(levels + 1))
        super().__init__(bits, levels, bucket_size, "max" if p == math.inf else "l2")

    def _level_magnitudes(self, level):
        # 2^(level - levels) written as fp32 bits (exact, and vectorises), 0 for level 0
        power = ((level.to(torch.int32) + (127 - self.levels)) << 23).view(torch.float32)
        return torch.where(level > 0, power, 0.0)

    def _rounding_variance(self, ratio):
        # between the powers of two around r (its exponent's bits alone), below the lowest
        # nonzero level between 0 and it
        smallest = 2.0 ** (1 - self.levels)
        small = ratio < smallest
        lo = torch.where(small, 0.0, (ratio.view(torch.int32) & 0x7F800000).view(torch.float32))
        hi = torch.where(small, smallest, 2.0 * lo)
        return (hi - ratio).mul_(ratio - lo)

    def _round(self, ratio, u):
        # On the fp32 bits: ratio = (1 + m / 2^23) * 2^e lies between the levels 2^e and
        # 2^(e+1), and goes up with probability m / 2^23 (exact; no frexp, which the compiler
        # would not fuse). Ratios below the lowest nonzero level 2^(1-levels) (>= 2^-126, so
        # every subnormal is among them) round between 0 and that level.
        bits = ratio.view(torch.int32)
        small = ratio < 2.0 ** (1 - self.levels)
        low = torch.where(small, 0, ((bits >> 23) & 0xFF) - 127 + self.levels)
        p_up = torch.where(small, ratio * 2.0 ** (self.levels - 1),
                           (bits & 0x7FFFFF).float() * 2.0 ** -23)
        return (low + (u.sub_(1.0) < p_up)).clamp_(max=self.levels).float()

    def __repr__(self):
        return f"NaturalDithering(levels={self.levels}, p={self.p}, bucket_size={self.bucket_size})"
