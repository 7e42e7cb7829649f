"""QSGD (Alistarh et al., 2017): stochastic, unbiased, bucketed quantization."""
from __future__ import annotations

import math

import torch

from .registry import register_codec
from .bucketed import BucketedLevelCodec


class EvenLevels:
    """QSGD's rounding, mixed into a :class:`BucketedLevelCodec`: ``levels`` evenly spaced
    magnitudes, ``|x| / norm`` rounded stochastically to one of its two neighbours."""

    def _level_magnitudes(self, level):
        return level / self.levels

    @property
    def _ratio_unit(self):
        return max(self.levels, 1)

    def _round(self, scaled, u):
        # floor(t + U), U ~ [0, 1), is floor(t) + 1 with probability frac(t): unbiased up to the
        # fp32 rounding of t + U (< 2^-16 of a level at 8 bits). That rounding can carry
        # t = levels over the top, hence the clamp.
        return scaled.add_(u).floor_().sub_(1.0).clamp_(max=self.levels)

    def _rounding_variance(self, ratio):
        # with t = r * levels, frac(t) (1 - frac(t)) / levels^2
        t = ratio.mul_(self.levels)
        fraction = t.sub_(torch.floor(t))
        return fraction.mul_(1.0 - fraction).div_(self.levels ** 2)


@register_codec("qsgd")
class QSGD(EvenLevels, BucketedLevelCodec):
    """QSGD with ``bits`` bits per entry (sign and level together) and one fp32 scale per
    bucket: ``levels = 2**(bits-1) - 1`` evenly spaced magnitudes, ``bits + 32/bucket_size``
    bits per coordinate on the wire.

    ``bits=1`` has no room for a zero level: each entry is sent as its sign alone, the two
    points ``-scale`` and ``+scale``, rounded stochastically (``+scale`` with probability
    ``(1 + x/scale) / 2``), so it stays unbiased, with variance ``scale^2 - x^2`` per entry.
    That variance is too large for error feedback, which is refused with it (and not needed:
    the codec is unbiased).

    ``norm="max"`` (the default, as in the paper's experiments) scales each bucket by its
    largest magnitude: lower variance, still unbiased. ``norm="l2"`` is the paper's analysed
    variant, with variance at most ``min(d/s^2, sqrt(d)/s) * ||v||^2`` per bucket.

    Example::

        >>> codec = QSGD(bits=4, bucket_size=512)
        >>> payload = codec.encode(torch.randn(10_000))
        >>> payload.nbytes == codec.wire_bytes(10_000)
        True
    """

    codec_id = 4
    name = "qsgd"

    def __init__(self, bits: int = 4, bucket_size: int = 512, norm: str = "max"):
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise ValueError(f"QSGD bits must be an integer in 1..8 (one is the sign), got {bits!r}")
        super().__init__(bits, 2 ** (bits - 1) - 1, bucket_size, norm)

    @property
    def _signs_only(self) -> bool:
        """One bit: the code is the rounded sign, over the two points -1 and +1."""
        return self.levels == 0

    @property
    def feedback_safe(self) -> bool:
        # signs only: relative variance about bucket_size; with error feedback (either kind)
        # the digits CNN ended at chance level, where without it it matched fp32
        return not self._signs_only

    def _fractions(self, codes):
        if self._signs_only:  # both codes are valid
            return codes * 2.0 - 1.0
        # evenly spaced levels: the signed code over the levels (the same bits as the general
        # magnitude-and-sign form, in two fewer operations per value)
        return torch.where(codes <= 2 * self.levels, (codes - self.levels) / self.levels, math.nan)

    def _codes(self, values, divisors, uniforms, dtype=torch.uint8):
        if not self._signs_only:
            return super()._codes(values, divisors, uniforms, dtype)
        ratio = values.float() / divisors  # in [-1, 1]; NaN and Inf to 0, as for more bits
        ratio = torch.where(ratio.abs() < math.inf, ratio, 0.0)
        # code 1 (+1) with probability (1 + ratio) / 2, given uniforms in [1, 2)
        return ratio.mul_(0.5).add_(uniforms).sub_(0.5).floor_().clamp_(0.0, 1.0).to(dtype)

    def _rounding_variance(self, ratio):
        if self._signs_only:  # between -1 and +1: (1 - r)(1 + r)
            return ratio.mul_(ratio).neg_().add_(1.0)
        return super()._rounding_variance(ratio)

    def __repr__(self):
        return f"QSGD(bits={self.bits}, bucket_size={self.bucket_size}, norm={self.norm!r})"
