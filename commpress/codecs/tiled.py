"""The compiled kernels of the bucketed level codecs (QSGD, natural dithering), over the tiles
of :func:`~commpress.codecs.bitpack.pack_tiled`: encode (scales, rounding and packing in one
pass), decode, and the one-pass mean of W payloads (:class:`~commpress.codecs.fused.FusedMean`).
They change speed only: the eager methods of
:class:`~commpress.codecs.bucketed.BucketedLevelCodec` are the reference and the fallback, and
both write the same bits.
"""
from __future__ import annotations

import torch

from . import bitpack, kernels


def _bucket_of_tile(tiles: int, per_bucket: int, device: torch.device) -> torch.Tensor:
    """Each tile's bucket (int32): an index the compiler sees constant over a tile's values
    (one per value compiled to a scalar gather)."""
    return torch.arange(tiles, dtype=torch.int32, device=device) // per_bucket


def _side_by_side(rows) -> torch.Tensor:
    """Tiles (one per row of the result) made of ``rows`` (each ``tiles x LANES``), row after
    row; one row is passed through (a one-row stack made the compiler spill to a temporary)."""
    return rows[0] if len(rows) == 1 else torch.stack(rows, 1).view(rows[0].shape[0], -1)


class TiledKernels:
    """Mixed into :class:`~commpress.codecs.bucketed.BucketedLevelCodec` before
    :class:`~commpress.codecs.fused.FusedMean`; uses its ``_divisors``, ``_codes``,
    ``_fractions`` and ``_store``."""

    def _kernel_rows(self) -> int:
        """Code rows of ``LANES`` values per tile of the fused kernels: a packing group's codes,
        and at least two, as each hash makes two uniforms (:func:`kernels.hashed_uniforms`)."""
        return max(bitpack.group_shape(self.bits)[0], 2)

    def _fused(self):
        """Whether the fused kernels apply: buckets hold whole kernel tiles."""
        return self.bucket_size % (self._kernel_rows() * bitpack.LANES) == 0

    def _fused_encoder(self):
        """The kernel, over tiles of :meth:`_kernel_rows` rows of ``LANES`` values: row ``k``
        holds code ``k`` of ``LANES`` packing groups (:func:`bitpack.pack_tiled`), so loads
        and stores are runs of consecutive values and bytes; lane ``j`` of a tile hashes once
        for the uniforms of its rows."""
        rows, lanes, d = self._kernel_rows(), bitpack.LANES, self.bucket_size
        per_group, group_bytes = bitpack.group_shape(self.bits)

        def encode(tiles, key, packed_out):
            torch._check(packed_out.shape[0] == tiles.shape[0])
            scales, divisors = self._divisors(tiles.view(-1))
            per_value = divisors[_bucket_of_tile(tiles.shape[0], d // (rows * lanes), tiles.device)]
            per_value = per_value.view(-1, 1)
            uniforms = kernels.hashed_uniforms(key, tiles.shape[0] * lanes, rows, tiles.device)
            codes = [self._codes(tiles[:, k, :], per_value, uniforms[k].view(-1, lanes),
                                 bitpack.word_dtype(self.bits)) for k in range(rows)]
            if per_group == 1:  # whole bytes: the codes are the body
                planes = [code.to(torch.uint8) for code in codes]
            else:
                word = codes[0]
                for k in range(1, rows):
                    word = word | (codes[k] << (k * self.bits))
                planes = [(word >> (8 * b)).to(torch.uint8) for b in range(group_bytes)]
            packed_out.copy_(_side_by_side(planes))
            return scales
        return encode

    def _fused_decoder(self):
        """The kernel, over tiles of :func:`bitpack.pack_tiled` (runs of ``LANES`` bytes in,
        ``LANES`` values out). ``alpha`` is an argument, not a constant of the closure: the
        kernel is cached per codec, and a cached closure would keep the first call's."""
        d, tile = self.bucket_size, bitpack.tile_values(self.bits)

        def decode(scales, packed, out, alpha):
            torch._check(out.shape[0] == packed.shape[0])  # tiles: the compiler sees them tied
            scale = scales[_bucket_of_tile(packed.shape[0], d // tile, packed.device)]
            self._store(self._tile_values(packed, scale), out, alpha)
            return out
        return decode

    def _mean_kernel_inputs(self, bodies, numel):
        """Scales ``(buckets, W)`` and packed tiles ``(tiles, W, tile bytes)`` of the whole
        buckets (made of whole tiles); a last partial bucket is left to :meth:`_decode_from`."""
        w, d, bits = bodies.shape[0], self.bucket_size, self.bits
        done = numel // d * d
        if not done or not self._fused():
            return None
        tile, nb = bitpack.tile_values(bits), self._buckets(numel)
        scales = bodies[:, : 4 * nb].contiguous().view(torch.float32)[:, : done // d].t().contiguous()
        packed = bodies[:, 4 * nb: 4 * nb + done * bits // 8].view(w, -1, tile * bits // 8).transpose(0, 1)
        return (scales, packed), done // tile, done

    def _payload_values(self, inputs, index):
        scales, packed = inputs
        bucket = _bucket_of_tile(packed.shape[0], self.bucket_size // bitpack.tile_values(self.bits),
                                 packed.device)
        return self._tile_values(packed[:, index, :], scales[bucket, index])

    def _tile_values(self, packed, scale):
        """The fp32 values of tiles (one per row) of :func:`bitpack.pack_tiled` bytes, given
        each tile's scale (one per row): one pointwise op over (tiles, codes per group,
        LANES), row ``k`` shifted by ``k`` codes (a stack of per-row results would go
        through a temporary)."""
        lanes, bits = bitpack.LANES, self.bits
        per_group, group_bytes = bitpack.group_shape(bits)
        wide = packed.to(bitpack.word_dtype(bits))
        word = wide[:, :lanes]
        for b in range(1, group_bytes):
            word = word | (wide[:, b * lanes: (b + 1) * lanes] << (8 * b))
        shift = torch.arange(per_group, dtype=word.dtype, device=packed.device).view(1, -1, 1)
        codes = (word.unsqueeze(1) >> (shift * bits)) & ((1 << bits) - 1)
        return (self._fractions(codes.float()) * scale.view(-1, 1, 1)).view(packed.shape[0], -1)
