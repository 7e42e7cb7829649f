"""One bit per entry: the sign, times the bucket's mean magnitude (EF-SignSGD's compressor).

``C(x) = (||x_b||_1 / d) * sign(x)`` per bucket ``b`` of ``d`` values is the scaled sign with
the least squared error (Karimireddy et al., 2019): ``||x_b||^2 - ||x_b||_1^2 / d`` per
bucket, so it is contractive, ``||C(x) - x||^2 <= (1 - delta) ||x||^2`` with
``delta = ||x||_1^2 / (d ||x||^2)``, the quantity rotation raises: after a randomized
Hadamard transform (:class:`~commpress.Rotated`) a bucket looks Gaussian and
``delta`` approaches ``2/pi``, a normalized error near ``1 - 2/pi = 0.36`` (DRIVE's codec).
It is deterministic and biased: train with error feedback (``+ef``), which corrects the bias
over steps. ``1 + 32/d`` bits per entry.
"""
from __future__ import annotations

import torch

from . import bitpack
from .base import Codec, register_codec


@register_codec("sign")
class ScaledSign(Codec):
    """The sign of each value, times its bucket's mean magnitude (see the module docstring).

    Args:
        bucket_size: values per scale (default 2048: 1.016 bits per entry).

    Example::

        >>> codec = Rotated(ScaledSign())          # about 0.36 of ||g||^2 lost, at 1.016 bits
        >>> state = commpress.register_hook(ddp_model, "signr+ef")
    """

    codec_id = 8
    name = "sign"
    unbiased = False
    bits = 1

    def __init__(self, bucket_size: int = 2048):
        if not isinstance(bucket_size, int) or isinstance(bucket_size, bool) or not 8 <= bucket_size <= 1 << 20:
            raise ValueError(f"bucket_size must be an integer from 8 to 2**20, got {bucket_size!r}")
        self.bucket_size = self.block_size = bucket_size

    def _params(self) -> tuple:
        return (1, 0, self.bucket_size)

    def _buckets(self, numel: int) -> int:
        return -(-numel // self.bucket_size)

    def _body_bytes(self, numel: int) -> int:
        return 4 * self._buckets(numel) + bitpack.packed_bytes(numel, 1)

    def _bucketed(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` as rows of a bucket, the last padded with zeros."""
        rows = self._buckets(flat.numel())
        padded = torch.zeros(rows * self.bucket_size, dtype=torch.float32, device=flat.device)
        padded[:flat.numel()] = flat
        return padded.view(rows, self.bucket_size)

    def _scales(self, flat: torch.Tensor) -> torch.Tensor:
        """Each bucket's mean magnitude (over its values, not the last bucket's padding)."""
        counts = torch.full((self._buckets(flat.numel()),), float(self.bucket_size),
                            device=flat.device)
        counts[-1] = flat.numel() - (counts.numel() - 1) * self.bucket_size
        return self._bucketed(flat).abs().sum(1).div_(counts)

    def _encode_body(self, flat, generator, out) -> None:
        nb = self._buckets(flat.numel())
        scales = self._scales(flat)
        # a non-finite value makes its bucket's scale non-finite: decoded as such, not hidden
        out[:4 * nb].view(torch.float32).copy_(scales)
        out[4 * nb:].copy_(bitpack.pack((flat < 0).to(torch.uint8), 1))

    def _decode_body(self, body, out, alpha=None) -> None:
        numel, nb = out.numel(), self._buckets(out.numel())
        scales = body[:4 * nb].clone().view(torch.float32)  # a payload may start at any byte
        negative = bitpack.unpack(body[4 * nb:], numel, 1)
        values = torch.repeat_interleave(scales, self.bucket_size)[:numel]
        values = torch.where(negative.bool(), -values, values)
        self._store(values, out, alpha)

    def __repr__(self) -> str:
        return f"ScaledSign(bucket_size={self.bucket_size})"
