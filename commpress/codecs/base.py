"""The codec protocol: what every codec implements, and what this base class does for all
of them (the header, the length checks, dtypes and shapes; see :mod:`commpress.codecs.wire`).
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Optional, Sequence, Tuple

import torch

from . import kernels
from .fused import mean_of_payloads
from .wire import _DTYPE_CODES, HEADER_BYTES, Header, Payload, checked, header_bytes, read_header


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

    def _encode_sized_body(self, flat: torch.Tensor, generator: Optional[torch.Generator],
                           room: int = 0) -> torch.Tensor:
        """A variable-length codec's body of ``flat`` (uint8, at most ``_body_bytes(numel)``
        long) after ``room`` bytes it leaves unset (the header, so the payload is written
        where it will be sent, not copied there)."""
        raise NotImplementedError

    def _stated_body_bytes(self, body: torch.Tensor, numel: int) -> int:
        """The length of a body of ``numel`` values: for a variable-length codec the one it
        states (``ValueError`` if that is impossible for ``numel`` values). Its
        :meth:`_decode_body` checks that length too: on an accelerator, where reading the
        statement stalls the stream, the decoders read it once (see ``wire._check_layout``)."""
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

    def encode(self, tensor: torch.Tensor, generator: Optional[torch.Generator] = None) -> Payload:
        check_float_tensor(tensor)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        numel = tensor.numel()
        if self.variable_length:
            data = self._encode_sized_body(tensor.reshape(-1), generator, room=HEADER_BYTES)
        else:
            nbytes = self.wire_bytes(numel)
            # storage in whole 8-byte words: a compiled kernel may write the body as wider words
            data = torch.empty(-(-nbytes // 8) * 8, dtype=torch.uint8, device=tensor.device)[:nbytes]
            if numel:
                self._encode_body(tensor.reshape(-1), generator, data[HEADER_BYTES:])
        data[:HEADER_BYTES].copy_(header_bytes(self, tensor.dtype, numel, tensor.device))
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
        data, numel, dtype = checked(self, payload, dtype, numel)
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
        data, numel, _ = checked(self, payload, torch.float32, out.numel())
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
        return mean_of_payloads(self, gathered, count, out, local, rank, spans)

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

    def read_header(self, data: torch.Tensor) -> Header:
        """Validate ``data`` as a payload of this codec and return its header."""
        return read_header(self, data)

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


