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

from . import bitpack, kernels
from .base import Codec
from .registry import register_codec
from .fused import FusedMean

#: bit ``k`` of a packed byte holds the sign of value ``8j + k`` (bitpack's 1-bit layout)
_SHIFTS = (0, 1, 2, 3, 4, 5, 6, 7)


def _encode_rows(x, scales_out, packed_out):
    """Whole buckets (rows of ``x``): each one's mean magnitude into ``scales_out``, its signs
    (1: negative) packed eight to a byte into ``packed_out``."""
    scales_out.copy_(x.abs().float().mean(1))
    negative = (x < 0).view(x.shape[0], -1, 8).to(torch.uint8)
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=x.device)
    packed_out.copy_((negative << shifts).sum(2, dtype=torch.uint8))
    return packed_out


def _row_values(packed, scales):
    """``+-scale`` by each packed sign: rows of ``8 * packed.shape[1]`` fp32 values."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    negative = ((packed.unsqueeze(2) >> shifts) & 1).view(packed.shape[0], -1).bool()
    scale = scales.unsqueeze(1).expand(negative.shape)
    return torch.where(negative, -scale, scale)


def _decode_rows(packed, scales, out):
    """The inverse of :func:`_encode_rows`."""
    out.copy_(_row_values(packed, scales))
    return out


def _decode_rows_fn():
    return _decode_rows


@register_codec("sign")
class ScaledSign(FusedMean, Codec):
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
        if not isinstance(bucket_size, int) or isinstance(bucket_size, bool) \
                or not 8 <= bucket_size <= 1 << 20 or bucket_size % 8:
            raise ValueError(f"bucket_size must be a multiple of 8 from 8 to 2**20, got "
                             f"{bucket_size!r}")
        self.bucket_size = self.block_size = bucket_size

    def _params(self) -> tuple:
        return (1, 0, self.bucket_size)

    def _buckets(self, numel: int) -> int:
        return -(-numel // self.bucket_size)

    def _body_bytes(self, numel: int) -> int:
        return 4 * self._buckets(numel) + bitpack.packed_bytes(numel, 1)

    def _encode_body(self, flat, generator, out) -> None:
        d, numel = self.bucket_size, flat.numel()
        nb, rows = self._buckets(numel), numel // d
        scales, packed = out[:4 * nb].view(torch.float32), out[4 * nb:]
        whole = rows * d
        if rows:  # whole buckets (eagerly: compiled, the row means ran 17x slower on the CPU)
            _encode_rows(flat[:whole].view(rows, d), scales[:rows],
                         packed[:whole // 8].view(rows, d // 8))
        if whole < numel:  # the last bucket, shorter
            tail = flat[whole:].float()
            scales[rows:].copy_(tail.abs().mean().reshape(1))
            packed[whole // 8:].copy_(bitpack.pack((tail < 0).to(torch.uint8), 1))

    def _decode_body(self, body, out, alpha=None) -> None:
        d, numel = self.bucket_size, out.numel()
        nb, rows = self._buckets(numel), numel // d
        scales = body[:4 * nb].clone().view(torch.float32)  # a payload may start at any byte
        packed, whole = body[4 * nb:], rows * d
        values = out if alpha is None and out.dtype == torch.float32 else torch.empty(
            numel, dtype=torch.float32, device=out.device)
        if rows:  # whole buckets: one compiled pass where it pays, else the same code eagerly
            args = (packed[:whole // 8].view(rows, d // 8), scales[:rows], values[:whole].view(rows, d))
            if not (kernels.usable(out.device, whole)
                    and kernels.run(("sign_decode", out.device.type), _decode_rows_fn, *args) is not None):
                _decode_rows(*args)
        if whole < numel:
            negative = bitpack.unpack(packed[whole // 8:], numel - whole, 1).bool()
            scale = scales[rows:].expand(numel - whole)
            torch.where(negative, -scale, scale, out=values[whole:])
        if values is not out:
            self._store(values, out, alpha)

    def _mean_kernel_inputs(self, bodies, numel):
        """Scales ``(buckets, W)`` and packed signs ``(buckets, W, d/8)`` of the whole buckets;
        a last, shorter bucket is left to :meth:`_decode_from`."""
        w, d = bodies.shape[0], self.bucket_size
        rows, nb = numel // d, self._buckets(numel)
        if not rows:
            return None
        scales = bodies[:, :4 * nb].contiguous().view(torch.float32)[:, :rows].t().contiguous()
        packed = bodies[:, 4 * nb: 4 * nb + rows * d // 8].reshape(w, rows, d // 8).transpose(0, 1)
        return (scales, packed), rows, rows * d

    def _payload_values(self, inputs, index):
        scales, packed = inputs
        return _row_values(packed[:, index, :], scales[:, index])

    def _decode_from(self, body, out, first, alpha=None) -> None:
        """The values from ``first`` on (0, or the start of the last, shorter bucket)."""
        if not first:
            return self._decode_body(body, out, alpha)
        numel, nb = out.numel(), self._buckets(out.numel())
        scale = body[4 * (nb - 1): 4 * nb].clone().view(torch.float32).expand(numel - first)
        negative = bitpack.unpack(body[4 * nb + first // 8:], numel - first, 1).bool()
        self._store(torch.where(negative, -scale, scale), out[first:], alpha)

    def __repr__(self) -> str:
        return f"ScaledSign(bucket_size={self.bucket_size})"
