"""The wire format of every codec's payloads, and the checks that refuse a malformed one.

A payload is one contiguous ``uint8`` tensor laid out as::

    header (24 bytes) | scales (fp32, codec-specific count) | packed codes

Header, little endian:

=====  ======  ===========================================================
bytes  field   meaning
=====  ======  ===========================================================
0-1    magic   ``b"CP"``
2      ver     format version (:data:`FORMAT_VERSION`)
3      codec   codec id (:attr:`Codec.codec_id`)
4      dtype   dtype of the encoded tensor (0 fp32, 1 fp16, 2 bf16)
5      a       first codec parameter (bits, levels)
6      b       second codec parameter (norm code)
7      -       reserved, zero
8-15   numel   number of encoded elements (int64)
16-19  block   block length the scales apply to (uint32)
20-23  crc     CRC-32 of bytes 0-19
=====  ======  ===========================================================

For fixed-width codecs everything after the header is a pure function of (codec, numel), so
ranks never exchange sizes before a collective, and :meth:`~commpress.codecs.Codec.decode` can reject any payload
whose length, header or parameters disagree with the codec that decodes it. A
``variable_length`` codec's body states its own length (``Codec._stated_body_bytes``),
never more than :meth:`~commpress.codecs.Codec.wire_bytes`, the bound for its element count; the collectives
exchange such payloads' sizes before moving them.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from .registry import codec_label

FORMAT_VERSION = 2  # 2: codes packed in tiles (bitpack.pack_tiled)
HEADER_BYTES = 24
_HEADER_CACHE_SIZE = 256  # (dtype, numel, device) headers kept per codec
_MAGIC = b"CP"
_HEADER = struct.Struct("<2sBBBBBBqI")  # 20 bytes, then the CRC
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


@dataclass(frozen=True)
class Header:
    codec_id: int
    dtype: torch.dtype
    param_a: int
    param_b: int
    numel: int
    block: int

    def to_bytes(self) -> bytes:
        head = _HEADER.pack(_MAGIC, FORMAT_VERSION, self.codec_id, _DTYPE_CODES[self.dtype],
                            self.param_a, self.param_b, 0, self.numel, self.block)
        return head + struct.pack("<I", zlib.crc32(head))

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Header":
        if len(raw) < HEADER_BYTES:
            raise ValueError(f"payload truncated: {len(raw)} bytes is shorter than the "
                             f"{HEADER_BYTES}-byte header")
        head, (crc,) = raw[:20], struct.unpack("<I", raw[20:24])
        magic, version, codec_id, dtype_code, a, b, reserved, numel, block = _HEADER.unpack(head)
        if magic != _MAGIC:
            raise ValueError(f"not a commpress payload (magic {magic!r}, expected {_MAGIC!r})")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported payload format version {version} "
                             f"(this commpress reads version {FORMAT_VERSION})")
        if zlib.crc32(head) != crc:
            raise ValueError("payload header is corrupted (CRC mismatch)")
        if dtype_code not in _CODE_DTYPES or reserved != 0 or numel < 0:
            raise ValueError("payload header has invalid fields "
                             f"(dtype code {dtype_code}, reserved {reserved}, numel {numel})")
        return cls(codec_id, _CODE_DTYPES[dtype_code], a, b, numel, block)


class PayloadError(ValueError):
    """A payload among several (:meth:`Codec.decode_mean`) that the codec cannot take:
    ``index`` says which."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"payload {index}: {reason}")
        self.index, self.reason = index, reason


@dataclass
class Payload:
    """An encoded tensor: ``data`` is the wire bytes, ``shape`` the host-side original shape.

    Only ``data`` crosses the network. A payload rebuilt from received bytes has
    ``shape=None`` and decodes to a 1-D tensor.
    """

    data: torch.Tensor
    shape: Optional[torch.Size] = None

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def header_bytes(codec, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
    """``codec``'s header for ``(dtype, numel)``, as a tensor on ``device``: made once per
    size and device and kept on the codec, so encoding needs no host->device copy per payload."""
    cache = codec.__dict__.setdefault("_header_cache", {})
    key = (dtype, numel, device)
    header = cache.get(key)  # one lookup: another thread may clear the cache meanwhile
    if header is None:
        if len(cache) >= _HEADER_CACHE_SIZE:
            cache.clear()
        a, b, block = codec._params()
        raw = Header(codec.codec_id, dtype, a, b, numel, block).to_bytes()
        header = cache[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
    return header


def checked(codec, payload: Payload, dtype: Optional[torch.dtype], numel: Optional[int]):
    """``(data, numel, dtype)`` of a payload that passed the checks :meth:`Codec.decode`
    names, or ``ValueError`` (``TypeError`` for a payload on the meta device)."""
    data = payload.data
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point
                                  and not dtype.is_complex):
        raise TypeError(f"decode's dtype must be a floating torch.dtype (e.g. torch.float32), "
                        f"got {dtype!r}")
    if numel is not None and (not isinstance(numel, int) or isinstance(numel, bool) or numel < 0):
        raise TypeError(f"decode's numel must be a non-negative int, got {numel!r}")
    if isinstance(data, torch.Tensor) and data.is_meta:
        raise TypeError("a payload on the meta device holds no bytes to decode (move it to "
                        "the CPU or the GPU it was encoded on)")
    if isinstance(data, torch.Tensor) and not data.is_contiguous():  # e.g. a strided view
        data = data.contiguous()
    if numel is not None and dtype is not None and data.device.type != "cpu":
        _check_layout(codec, data, numel)
    else:
        header = read_header(codec, data)
        if numel is not None and header.numel != numel:
            raise ValueError(f"payload holds {header.numel} elements, {numel} expected")
        numel, dtype = header.numel, dtype or header.dtype
    return data, numel, dtype


def _check_layout(codec, data: torch.Tensor, numel: int) -> None:
    """The checks of :func:`read_header` that need no look at the bytes. A variable-length
    payload is held to its bound here; its decoder checks the length its body states when it
    reads that statement (one host read per payload, not two)."""
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("a payload must be a 1-D uint8 tensor")
    if codec.variable_length:
        bound = codec.wire_bytes(numel)
        if not HEADER_BYTES < data.numel() <= bound:
            raise ValueError(f"payload length {data.numel()} lies outside the {HEADER_BYTES + 1}"
                             f"-{bound} bytes {codec!r} produces for {numel} elements")
        return
    expected = codec.wire_bytes(numel)
    if data.numel() != expected:
        raise ValueError(f"payload length {data.numel()} does not match the {expected} bytes "
                         f"{codec!r} produces for {numel} elements")


def read_header(codec, data: torch.Tensor) -> Header:
    """Validate ``data`` as a payload of ``codec`` and return its header."""
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("a payload must be a 1-D uint8 tensor")
    header = Header.from_bytes(bytes(data[:HEADER_BYTES].cpu().numpy()))
    if header.codec_id != codec.codec_id:
        raise ValueError(f"payload was encoded by {codec_label(header.codec_id)}, "
                         f"not by {codec.name} (codec id {codec.codec_id})")
    if (header.param_a, header.param_b, header.block) != codec._params():
        raise ValueError(f"payload parameters {(header.param_a, header.param_b, header.block)} "
                         f"do not match {codec!r} {codec._params()}")
    expected = _expected_bytes(codec, data, header.numel)
    if data.numel() != expected:
        raise ValueError(f"payload length {data.numel()} does not match the {expected} bytes "
                         f"{codec!r} produces for {header.numel} elements "
                         f"({'truncated' if data.numel() < expected else 'trailing bytes'})")
    return header


def _expected_bytes(codec, data: torch.Tensor, numel: int) -> int:
    """The length payload ``data`` of ``numel`` values must have (read from its body for a
    variable-length codec: a host read)."""
    if not codec.variable_length:
        return codec.wire_bytes(numel)
    return HEADER_BYTES + codec._stated_body_bytes(data[HEADER_BYTES:], numel)
