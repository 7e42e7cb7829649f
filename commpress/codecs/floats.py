"""Uncompressed and half-precision baselines (deterministic, summable)."""
from __future__ import annotations

import torch

from .base import Codec
from .registry import register_codec
from .bucketed import aligned


class _CastCodec(Codec):
    """Sends the tensor cast to ``wire_dtype``, byte for byte."""

    wire_dtype: torch.dtype
    summable = True

    def _body_bytes(self, numel):
        return numel * self.wire_dtype.itemsize

    def _encode_body(self, flat, generator, out):
        out.view(self.wire_dtype).copy_(flat)

    def _decode_body(self, body, out, alpha=None):
        self._store(aligned(body, self.wire_dtype.itemsize).view(self.wire_dtype), out, alpha)


@register_codec("identity", "fp32", "none")
class Identity(_CastCodec):
    """fp32 on the wire whatever the input dtype: the exact baseline (so the size depends on
    ``numel`` only)."""

    codec_id, name, wire_dtype = 1, "identity", torch.float32


@register_codec("fp16")
class FP16(_CastCodec):
    """IEEE half on the wire (2x). Values beyond +-65504 become +-inf, as with PyTorch's
    ``fp16_compress_hook``: loss scaling then sees an overflow."""

    codec_id, name, wire_dtype = 2, "fp16", torch.float16
    unbiased = False


@register_codec("bf16")
class BF16(_CastCodec):
    """bfloat16 on the wire (2x): fp32's range, 8 bits of mantissa."""

    codec_id, name, wire_dtype = 3, "bf16", torch.bfloat16
    unbiased = False
