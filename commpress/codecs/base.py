"""Codec protocol, the :class:`Payload` wire format, and the codec name registry.

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
ranks never exchange sizes before a collective, and :meth:`Codec.decode` can reject any payload
whose length, header or parameters disagree with the codec that decodes it. A
``variable_length`` codec's body states its own length (:meth:`Codec._stated_body_bytes`),
never more than :meth:`Codec.wire_bytes`, the bound for its element count; the collectives
exchange such payloads' sizes before moving them.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Sequence, Tuple

import torch

from . import kernels

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


def check_float_tensor(tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _DTYPE_CODES:
        raise TypeError(f"commpress codecs encode float32, float16 or bfloat16 tensors, "
                        f"got {tensor.dtype}")
    if tensor.layout != torch.strided:
        raise TypeError(f"commpress codecs encode dense (strided) tensors, got {tensor.layout}: "
                        f"densify it first (tensor.to_dense())")
    if tensor.is_meta:
        raise TypeError("commpress codecs encode tensors that hold data, got a meta tensor "
                        "(materialize the model first, e.g. model.to_empty(device=...))")


def saturating_cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, finite values beyond its range clamped to its largest finite
    ones (infinities and NaNs kept). A mean that is finite in fp32 stays finite in fp16: an
    unbiased codec may round a value near fp16's maximum one level up, past it."""
    if values.dtype == dtype:
        return values
    if not values.dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(values.dtype).max:
        return values.to(dtype)
    big = torch.finfo(dtype).max
    return torch.where(values.isfinite(), values.clamp(-big, big), values).to(dtype)


class Codec:
    """Turns a float tensor into a :class:`Payload` and back.

    Subclasses set ``codec_id`` and ``name``, and implement :meth:`_body_bytes`,
    :meth:`_encode_body` (flat tensor -> the uint8 body) and :meth:`_decode_body`
    (uint8 body -> flat tensor); a stochastic one may give :meth:`_sq_error` (for EF21). This
    base class owns the header, the length checks and the dtype/shape bookkeeping, so no codec
    can forget them. That is all a new codec needs; decoding W payloads in one compiled pass
    is a separate protocol (:class:`~commpress.codecs.fused.FusedMean`), for speed only.
    """

    codec_id: ClassVar[int]
    name: ClassVar[str]
    #: chunks of a vector split for ``reduce_scatter`` start at multiples of this
    block_size: int = 1
    #: True when the encoding of a sum is the sum of encodings (plain all_reduce works)
    summable: ClassVar[bool] = False
    #: True when ``E[decode(encode(x))] == x``
    unbiased: ClassVar[bool] = True
    #: True when ``encode`` draws random numbers
    stochastic: ClassVar[bool] = False
    #: False when error-feedback memories grow without bound under this codec (its relative
    #: variance is far above 1): front ends refuse error feedback with it
    feedback_safe: ClassVar[bool] = True
    #: True when a payload's size depends on the data (it implements
    #: :meth:`_encode_sized_body` and :meth:`_stated_body_bytes`; :meth:`wire_bytes` is the bound)
    variable_length: ClassVar[bool] = False

    # -- to implement -------------------------------------------------------------------
    def _params(self) -> tuple:
        """(param_a, param_b, block) written into the header."""
        return (0, 0, 0)

    def _body_bytes(self, numel: int) -> int:
        raise NotImplementedError

    def _encode_body(self, flat: torch.Tensor, generator: Optional[torch.Generator],
                     out: torch.Tensor) -> None:
        """Write the body of non-empty ``flat`` into ``out`` (``_body_bytes`` uint8s)."""
        raise NotImplementedError

    def _encode_sized_body(self, flat: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """A variable-length codec's body of non-empty ``flat`` (uint8, at most
        ``_body_bytes(numel)`` long)."""
        raise NotImplementedError

    def _stated_body_bytes(self, body: torch.Tensor, numel: int) -> int:
        """The length of a body of ``numel`` values: for a variable-length codec the one it
        states (``ValueError`` if that is impossible for ``numel`` values)."""
        return self._body_bytes(numel)

    def _decode_body(self, body: torch.Tensor, out: torch.Tensor, alpha: Optional[float] = None) -> None:
        """Fill the non-empty flat ``out`` (any float dtype) from a length-checked ``body``;
        with ``alpha``, add the decoded values times ``alpha`` to fp32 ``out`` instead. This
        default decodes into a temporary for that."""
        raise NotImplementedError

    @staticmethod
    def _store(values: torch.Tensor, out: torch.Tensor, alpha: Optional[float]) -> None:
        """``out = values``, or with ``alpha``, ``out += values * alpha`` (one rounding order
        for every codec and path, so every rank sums bit-identically)."""
        if alpha is None:
            out.copy_(values)
        else:
            out.add_(values.to(out.dtype) * alpha)

    # -- public API ---------------------------------------------------------------------
    @property
    def short_name(self) -> str:
        """How plans and summaries name this codec: ``"qsgd4"`` rather than ``"qsgd"``."""
        return self.name + str(getattr(self, "bits", ""))

    def expected_sq_error(self, flat: torch.Tensor) -> Optional[torch.Tensor]:
        """``E||decode(encode(flat)) - flat||^2`` (a 0-d fp32 tensor) for stochastic codecs,
        computed from the rounding probabilities; None for deterministic ones. EF21 uses it to
        make an unbiased codec contractive (see :mod:`commpress.feedback`). The whole blocks
        of a large vector go through one compiled pass; the rest (all of it, eagerly) in
        block-aligned slices of about ``SQ_ERROR_SLICE`` elements, so its temporaries stay
        small next to the vector."""
        flat = flat.reshape(-1)
        step = max(SQ_ERROR_SLICE // self.block_size, 1) * self.block_size
        total, whole = None, flat.numel() // self.block_size * self.block_size
        if self.stochastic and kernels.usable(flat.device, whole):
            total = kernels.run(("sq_error", repr(self), flat.device.type), self._sq_error_kernel,
                                flat[:whole])
        start = whole if total is not None else 0
        for lo in range(start, max(flat.numel(), 1), step):  # one (empty) slice for an empty flat
            part = self._sq_error(flat[lo:lo + step])
            if part is None:
                return None
            total = part if total is None else total + part
        return total

    def _sq_error_kernel(self) -> Callable:
        """:meth:`_sq_error` as a function to compile (the fused path of
        :meth:`expected_sq_error`)."""
        def sq_error(flat):
            return self._sq_error(flat)
        return sq_error

    def _sq_error(self, part: torch.Tensor) -> Optional[torch.Tensor]:
        """:meth:`expected_sq_error` of a block-aligned slice, possibly empty."""
        return None

    def wire_bytes(self, numel: int) -> int:
        """Exact payload size in bytes for a tensor of ``numel`` elements (the largest, for a
        ``variable_length`` codec)."""
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        return HEADER_BYTES + self._body_bytes(numel)

    def _header(self, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
        """The header bytes for ``(dtype, numel)``, as a tensor on ``device``: made once per
        bucket size and device, so encoding needs no host->device copy per payload."""
        cache = self.__dict__.setdefault("_header_cache", {})
        key = (dtype, numel, device)
        header = cache.get(key)  # one lookup: another thread may clear the cache meanwhile
        if header is None:
            if len(cache) >= _HEADER_CACHE_SIZE:
                cache.clear()
            a, b, block = self._params()
            raw = Header(self.codec_id, dtype, a, b, numel, block).to_bytes()
            header = cache[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
        return header

    def encode(self, tensor: torch.Tensor, generator: Optional[torch.Generator] = None) -> Payload:
        check_float_tensor(tensor)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        numel = tensor.numel()
        body = self._encode_sized_body(tensor.reshape(-1), generator) if self.variable_length else None
        nbytes = self.wire_bytes(numel) if body is None else HEADER_BYTES + body.numel()
        # storage in whole 8-byte words: a compiled kernel may write the body as wider words
        data = torch.empty(-(-nbytes // 8) * 8, dtype=torch.uint8, device=tensor.device)[:nbytes]
        data[:HEADER_BYTES].copy_(self._header(tensor.dtype, numel, tensor.device))
        if body is not None:
            data[HEADER_BYTES:] = body
        elif numel:
            self._encode_body(tensor.reshape(-1), generator, data[HEADER_BYTES:])
        return Payload(data, tensor.shape)

    def decode(self, payload: Payload, dtype: Optional[torch.dtype] = None,
               numel: Optional[int] = None) -> torch.Tensor:
        """Decode to the original shape and dtype (or ``dtype`` if given, e.g. float32 for
        reducing fp16 payloads without overflow). Raises ``ValueError`` on a payload that this
        codec did not produce.

        ``numel`` (with ``dtype``): the element count the caller expects, as the collectives
        know it. On an accelerator the header is then not copied back to the host (that copy
        would stall the stream for every payload): the length must be ``wire_bytes(numel)``,
        and the configuration agreement has already checked codec and sizes across ranks. On
        the CPU the header is always checked."""
        data, numel, dtype = self._checked(payload, dtype, numel)
        if payload.shape is not None and math.prod(payload.shape) != numel:
            raise ValueError(f"payload holds {numel} elements but its shape is {tuple(payload.shape)}")
        # narrower dtypes decode through fp32, so a value rounded past their range saturates
        wide = dtype if torch.finfo(dtype).max >= torch.finfo(torch.float32).max else torch.float32
        flat = torch.empty(numel, dtype=wide, device=data.device)
        if numel:
            self._decode_body(data[HEADER_BYTES:], flat)
        flat = saturating_cast(flat, dtype)
        return flat.view(payload.shape if payload.shape is not None else (numel,))

    def decode_into(self, payload: Payload, out: torch.Tensor, alpha: Optional[float] = None) -> torch.Tensor:
        """``out[:] = decode(payload)`` for a flat float ``out`` holding as many elements as the
        payload (checked as :meth:`decode` checks with ``numel``); with ``alpha``, ``out +=
        decode(payload) * alpha`` for an fp32 ``out``. The bucketed codecs decode straight into
        ``out``, with no full-size temporary: the collectives sum W payloads this way, into
        buffers allocated once per vector."""
        if out.dim() != 1 or not out.dtype.is_floating_point or (
                alpha is not None and out.dtype != torch.float32):
            raise ValueError(f"decode_into writes into a 1-D float tensor (float32 to accumulate), "
                             f"got {out.dtype} of shape {tuple(out.shape)}")
        data, numel, _ = self._checked(payload, torch.float32, out.numel())
        if numel:
            self._decode_body(data[HEADER_BYTES:], out, alpha)
        return out

    def decode_mean(self, gathered: torch.Tensor, count: int, out: torch.Tensor,
                    local: Optional[torch.Tensor] = None, rank: int = -1,
                    spans: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
        """``out[:] =`` the mean of the ``count`` equal-length payloads laid end to end in
        ``gathered`` (what an all-gather returns), for a flat fp32 ``out``; with ``local``,
        payload ``rank`` decoded is also written there. Each is decoded, times ``1 / count``,
        and added in order to zero, as :meth:`decode_into` with ``alpha`` adds: every path
        gives every rank the same bits. QSGD, D_nat and C_nat decode all of them in one
        compiled pass that writes ``out`` once. ``spans``: each payload's ``(start, length)``
        in ``gathered`` instead (variable-length payloads, in padded slots or end to end).
        Raises :class:`PayloadError` naming the first payload this codec cannot take."""
        if spans is None:
            if count < 1 or gathered.numel() % count:
                raise ValueError(f"{gathered.numel()} bytes do not hold {count} equal payloads")
            size = gathered.numel() // count
            spans = [(index * size, size) for index in range(count)]
        elif len(spans) != count or count < 1 or any(
                start < 0 or length < 0 or start + length > gathered.numel() for start, length in spans):
            raise ValueError(f"spans {list(spans)} do not place {count} payloads in "
                             f"{gathered.numel()} bytes")
        if local is not None and not 0 <= rank < count:
            raise ValueError(f"rank {rank} names none of the {count} payloads to decode into local")
        numel = out.numel()
        bodies = []
        for index, (start, length) in enumerate(spans):
            try:
                data, _, _ = self._checked(Payload(gathered[start:start + length]), torch.float32, numel)
            except ValueError as exc:
                raise PayloadError(index, str(exc)) from None
            bodies.append(data[HEADER_BYTES:])
        equal = len({length for _, length in spans}) == 1 and all(
            start == index * spans[0][1] for index, (start, _) in enumerate(spans))
        done = self._decode_mean_body(gathered[: count * spans[0][1]].view(count, -1)[:, HEADER_BYTES:],
                                      out, local, rank) if numel and equal else 0
        if done == numel:
            return out
        share = 1.0 / count
        out[done:].zero_()
        for index, body in enumerate(bodies):
            if index == rank and local is not None:
                self._decode_from(body, local, done)
                self._store(local[done:], out[done:], share)
            else:
                self._decode_from(body, out, done, share)
        return out

    def _decode_mean_body(self, bodies: torch.Tensor, out: torch.Tensor,
                          local: Optional[torch.Tensor], rank: int) -> int:
        """How many leading values of :meth:`decode_mean` a one-pass kernel wrote (0: none;
        see :class:`~commpress.codecs.fused.FusedMean`, which codecs with one mix in)."""
        return 0

    def _decode_from(self, body: torch.Tensor, out: torch.Tensor, first: int,
                     alpha: Optional[float] = None) -> None:
        """:meth:`_decode_body` of the values from ``first`` on only (those before it are
        written already); codecs whose mean kernel covers a leading part override it."""
        if first:
            raise NotImplementedError(f"{type(self).__name__} decodes whole payloads only")
        self._decode_body(body, out, alpha)

    def _checked(self, payload: Payload, dtype: Optional[torch.dtype], numel: Optional[int]):
        """``(data, numel, dtype)`` of a payload that passed the checks :meth:`decode` names."""
        data = payload.data
        if isinstance(data, torch.Tensor) and data.is_meta:
            raise TypeError("a payload on the meta device holds no bytes to decode (move it to "
                            "the CPU or the GPU it was encoded on)")
        if isinstance(data, torch.Tensor) and not data.is_contiguous():  # e.g. a strided view
            data = data.contiguous()
        if numel is not None and dtype is not None and data.device.type != "cpu":
            self._check_layout(data, numel)
        else:
            header = self.read_header(data)
            if numel is not None and header.numel != numel:
                raise ValueError(f"payload holds {header.numel} elements, {numel} expected")
            numel, dtype = header.numel, dtype or header.dtype
        return data, numel, dtype

    def _check_layout(self, data: torch.Tensor, numel: int) -> None:
        """The checks of :meth:`read_header` that need no look at the bytes."""
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError("a payload must be a 1-D uint8 tensor")
        expected = self._expected_bytes(data, numel)
        if data.numel() != expected:
            raise ValueError(f"payload length {data.numel()} does not match the {expected} bytes "
                             f"{self!r} produces for {numel} elements")

    def read_header(self, data: torch.Tensor) -> Header:
        """Validate ``data`` as a payload of this codec and return its header."""
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError("a payload must be a 1-D uint8 tensor")
        header = Header.from_bytes(bytes(data[:HEADER_BYTES].cpu().numpy()))
        if header.codec_id != self.codec_id:
            raise ValueError(f"payload was encoded by {_codec_name(header.codec_id)}, "
                             f"not by {self.name} (codec id {self.codec_id})")
        if (header.param_a, header.param_b, header.block) != self._params():
            raise ValueError(f"payload parameters {(header.param_a, header.param_b, header.block)} "
                             f"do not match {self!r} {self._params()}")
        expected = self._expected_bytes(data, header.numel)
        if data.numel() != expected:
            raise ValueError(f"payload length {data.numel()} does not match the {expected} bytes "
                             f"{self!r} produces for {header.numel} elements "
                             f"({'truncated' if data.numel() < expected else 'trailing bytes'})")
        return header

    def _expected_bytes(self, data: torch.Tensor, numel: int) -> int:
        """The length payload ``data`` of ``numel`` values must have (read from its body for
        a variable-length codec: a host read)."""
        if not self.variable_length:
            return self.wire_bytes(numel)
        return HEADER_BYTES + self._stated_body_bytes(data[HEADER_BYTES:], numel)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._params() == other._params()

    def __hash__(self) -> int:
        return hash((type(self), self._params()))


def contractive_factor(codec: "Codec", x: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + omega)`` with ``omega = E||C(x) - x||^2 / ||x||^2`` for this ``x`` (1 for
    deterministic codecs, zero or non-finite ``x``). Compressing ``x`` scaled by it turns an
    unbiased codec into a contractive one: ``E||C(lam x) - x||^2 = omega / (1 + omega) ||x||^2``
    (for codecs whose rounding scales with the input: QSGD, D_nat; C_nat to within its powers
    of two). Error-feedback schemes need that: with QSGD-2 (omega > 1) their memories grew
    without bound."""
    error = codec.expected_sq_error(x)
    one = torch.ones((), device=x.device)
    if error is None:
        return one
    norm = torch.linalg.vector_norm(x, dtype=torch.float32).square()  # no full-size temporary
    factor = 1 / (1 + error / norm)
    return torch.where((norm > 0) & torch.isfinite(factor), factor, one)


#: Elements per slice of :meth:`Codec.expected_sq_error`
SQ_ERROR_SLICE = 1 << 18

#: Elements per step of the chunked CPU kernels: a few MB of temporaries that stay in cache
#: and are recycled by the allocator, instead of page-faulting fresh 100 MB tensors.
CPU_CHUNK = 1 << 18


def chunk_ranges(numel: int, align: int, device: torch.device, first: int = 0):
    """``(start, stop)`` ranges covering ``first..numel`` (``first`` a multiple of ``align``)
    with starts at multiples of ``align``: cache-sized on CPU, one range on accelerators
    (where each op is one big kernel)."""
    if device.type != "cpu":
        if first < numel:
            yield first, numel
        return
    step = max(align, CPU_CHUNK // align * align)
    for start in range(first, numel, step):
        yield start, min(start + step, numel)


_REGISTRY: Dict[str, Callable[..., Codec]] = {}


def _codec_name(codec_id: int) -> str:
    """How an error names the codec of a wire ``codec_id``."""
    names = sorted({cls.name for cls in _REGISTRY.values() if cls.codec_id == codec_id})
    return f"{names[0]} (codec id {codec_id})" if names else f"an unknown codec (id {codec_id})"


def register_codec(*names: str):
    """Class decorator: make a codec constructible by ``get_codec(name, **kwargs)``. A name
    or a wire ``codec_id`` already taken by another codec is refused: payloads name their
    codec by id, so two codecs sharing one would decode each other's bytes."""
    def wrap(cls):
        for other in set(_REGISTRY.values()):
            if other is not cls and other.codec_id == cls.codec_id:
                raise ValueError(f"codec id {cls.codec_id} of {cls.__name__} is already "
                                 f"{other.__name__}'s")
        for name in names:
            if _REGISTRY.get(name, cls) is not cls:
                raise ValueError(f"codec name {name!r} is already {_REGISTRY[name].__name__}")
        for name in names:
            _REGISTRY[name] = cls
        return cls
    return wrap


def get_codec(name: str, **kwargs) -> Codec:
    """Build a codec by name, e.g. ``get_codec("qsgd", bits=4)``."""
    try:
        factory = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**kwargs)


def codec_names() -> list:
    return sorted(_REGISTRY)
