"""Rotation before quantizing: a seeded randomized Hadamard transform around any codec.

Gradients are heavy-tailed: a few large entries set a bucket's scale and every other entry is
rounded coarsely against it. Multiplying by random signs ``D`` and an orthonormal Hadamard
matrix ``H`` (blocks of ``block`` values) spreads each block's energy evenly, so every bucket
of the rotated vector looks Gaussian and the same bits quantize it with less error (the idea
of DRIVE/EDEN, THC and SDP4Bit). The transform is orthogonal and linear, so:

- ``||R x - y||`` is ``||x - R^T y||``: the codec's error is measured in either domain;
- with an unbiased codec ``C``, ``R^T C(R x)`` is unbiased for any fixed ``R``; the signs
  come from ``seed`` and every rank draws the same, so no per-step agreement is needed;
- the mean of ``R^T y_i`` is ``R^T`` of the mean: :meth:`Rotated.decode_mean` decodes all
  payloads in the rotated domain (with the codec's own fused kernel) and rotates back once.

Error feedback works unchanged: the memories live in the gradient's domain, and what the
codec lost, ``p - R^T C(R p)``, is what the decode gives back. The tail of a vector that does
not fill a block (under ``block`` values) is sent unrotated.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, Optional

import torch

from .base import Codec
from .registry import register_codec

#: rotated vectors (sign vectors) kept per (length, device), so a training step's buckets
#: draw their signs once
_SIGN_CACHE_SIZE = 16


def hadamard(block: int, device: torch.device) -> torch.Tensor:
    """The ``block x block`` orthonormal Hadamard matrix (Sylvester's construction), fp32."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(block)).to(torch.float32).to(device)


@register_codec("rotated")
class Rotated(Codec):
    """``inner`` applied to the vector rotated by a seeded randomized Hadamard transform
    (see the module docstring); the payload is ``inner``'s body under a header of its own.

    Args:
        inner: the codec to wrap (a quantizer: QSGD, natural dithering, C_nat; the float
            casts gain nothing from rotation and are refused).
        block: the Hadamard block, a power of two from 2 to 4096; default: the inner codec's
            bucket (each bucket then holds one rotated block, one Gaussian-looking
            population under its one scale), else 256. The transform costs two small matrix
            products (``H_block = H_k (x) H_m``, ``m <= 256``): at most ``m + k`` multiply-adds
            per value.
        seed: the signs' seed, the same on every rank.

    Example::

        >>> codec = Rotated(QSGD(bits=2, bucket_size=128))
        >>> codec.decode(codec.encode(torch.randn(4096))).shape
        torch.Size([4096])
    """

    codec_id = 7
    name = "rotated"  # an instance is named after its inner codec: "rot-qsgd"

    def __init__(self, inner: Codec, block: Optional[int] = None, seed: int = 0):
        if not isinstance(inner, Codec) or isinstance(inner, Rotated):
            raise TypeError(f"Rotated wraps a commpress Codec (not a Rotated one), got {inner!r}")
        if inner.summable:
            raise ValueError(f"Rotated({inner!r}): a float cast keeps each value's relative "
                             f"error whatever its neighbours, so rotating it gains nothing")
        if block is None:
            bucket = getattr(inner, "bucket_size", 0)
            block = bucket if 2 <= bucket <= 4096 and not bucket & (bucket - 1) else 256
        if not isinstance(block, int) or isinstance(block, bool) or block < 2 or block > 4096 \
                or block & (block - 1):
            raise ValueError(f"block must be a power of two from 2 to 4096, got {block!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.inner, self.block, self.seed = inner, block, seed
        self.block_size = math.lcm(inner.block_size, block)
        self.stochastic, self.unbiased = inner.stochastic, inner.unbiased
        self.feedback_safe = inner.feedback_safe
        self.variable_length = inner.variable_length
        self.name = f"rot-{inner.name}"
        if hasattr(inner, "bits"):
            self.bits = inner.bits
        self._signs: Dict[tuple, torch.Tensor] = {}

    @property
    def short_name(self) -> str:
        return f"rot-{self.inner.short_name}"

    # -- the transform ----------------------------------------------------------------------
    def _sign_vector(self, numel: int, device: torch.device) -> torch.Tensor:
        key = (numel, device)
        signs = self._signs.get(key)
        if signs is None:
            if len(self._signs) >= _SIGN_CACHE_SIZE:
                self._signs.clear()
            gen = torch.Generator().manual_seed(self.seed)
            signs = torch.randint(0, 2, (numel,), generator=gen, dtype=torch.int8)
            signs = signs.mul_(2).sub_(1).to(device=device, dtype=torch.float32)
            self._signs[key] = signs
        return signs

    def rotate(self, flat: torch.Tensor) -> torch.Tensor:
        """``R flat`` as a new fp32 vector (whole blocks rotated, the tail copied)."""
        flat = flat.reshape(-1)
        whole = flat.numel() // self.block * self.block
        out = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
        if whole:
            signed = flat[:whole].to(torch.float32) * self._sign_vector(whole, flat.device)
            out[:whole].copy_(self._hadamard(signed))
        out[whole:].copy_(flat[whole:])
        return out

    def _hadamard(self, flat: torch.Tensor) -> torch.Tensor:
        """``H_block`` applied to each block of ``flat`` (whole blocks): as ``H_k (x) H_m``
        (Sylvester's matrices are Kronecker products), ``H_k X H_m`` on each block viewed as
        ``k x m``, two small matrix products instead of one of ``block^2`` per block."""
        m = min(self.block, 256)
        k = self.block // m
        rows = flat.view(-1, k, m) @ _hadamard_of(m, flat.device)
        if k > 1:
            rows = torch.matmul(_hadamard_of(k, flat.device), rows)
        return rows.view(-1)

    def unrotate_(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat = R^T flat`` for an fp32 vector, in place (through one temporary)."""
        whole = flat.numel() // self.block * self.block
        if whole:  # H is symmetric and orthonormal: its own inverse
            head = flat[:whole]
            torch.mul(self._hadamard(head), self._sign_vector(whole, flat.device), out=head)
        return flat

    # -- the codec --------------------------------------------------------------------------
    def _params(self) -> tuple:
        """The inner codec's id, log2(block), and a checksum of the inner configuration and
        seed: a payload of another rotation or inner codec is refused, not misread."""
        check = zlib.crc32(f"{self.inner!r}/{self.seed}".encode()) & 0x7FFFFFFF
        return (self.inner.codec_id, int(math.log2(self.block)), check)

    def _body_bytes(self, numel: int) -> int:
        return self.inner._body_bytes(numel)

    def _encode_body(self, flat, generator, out) -> None:
        self.inner._encode_body(self.rotate(flat), generator, out)

    def _encode_sized_body(self, flat, generator, room=0):
        return self.inner._encode_sized_body(self.rotate(flat), generator, room)

    def _stated_body_bytes(self, body, numel) -> int:
        return self.inner._stated_body_bytes(body, numel)

    def _decode_body(self, body, out, alpha=None) -> None:
        values = torch.empty(out.numel(), dtype=torch.float32, device=out.device)
        self.inner._decode_body(body, values)
        self._store(self.unrotate_(values), out, alpha)

    def _decode_mean_body(self, bodies, out, local, rank) -> int:
        return self.inner._decode_mean_body(bodies, out, local, rank)  # rotated domain

    def _decode_from(self, body, out, first, alpha=None) -> None:
        self.inner._decode_from(body, out, first, alpha)  # rotated domain

    def decode_mean(self, gathered: torch.Tensor, count: int, out: torch.Tensor,
                    local: Optional[torch.Tensor] = None, rank: int = -1,
                    spans=None) -> torch.Tensor:
        """The mean decoded in the rotated domain (the inner codec's kernels), rotated back
        once (and ``local``, this rank's own payload, too)."""
        super().decode_mean(gathered, count, out, local, rank, spans)
        if local is not None:
            self.unrotate_(local)
        return self.unrotate_(out)

    def expected_sq_error(self, flat: torch.Tensor) -> Optional[torch.Tensor]:
        """The inner codec's, on the rotated vector (the rotation keeps norms)."""
        return self.inner.expected_sq_error(self.rotate(flat))

    def __repr__(self) -> str:
        return f"Rotated({self.inner!r}, block={self.block}, seed={self.seed})"


_HADAMARDS: Dict[tuple, torch.Tensor] = {}


def _hadamard_of(block: int, device: torch.device) -> torch.Tensor:
    key = (block, device)
    if key not in _HADAMARDS:
        _HADAMARDS[key] = hadamard(block, device)
    return _HADAMARDS[key]
