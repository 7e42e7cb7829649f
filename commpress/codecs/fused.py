"""The fused-kernel protocol of the codecs: :meth:`~commpress.codecs.Codec.decode_mean` of W
payloads in one compiled pass that writes the mean once (C++ on the CPU, Triton on a GPU).

A codec gains it by mixing :class:`FusedMean` in before :class:`~commpress.codecs.Codec` and
giving :meth:`~FusedMean._mean_kernel_inputs` (the tensors the kernel reads) and
:meth:`~FusedMean._payload_values` (one payload's fp32 values, inside the kernel), and
``_decode_from`` for the values a kernel over whole blocks leaves. It changes speed only: the
kernel adds the payloads in the order and with the rounding of the eager path, so every rank
and every path give the same bits, and the eager path stays the reference and the fallback.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import kernels
from .wire import HEADER_BYTES, Payload, PayloadError, checked


def mean_of_payloads(codec, gathered: torch.Tensor, count: int, out: torch.Tensor,
                     local: Optional[torch.Tensor] = None, rank: int = -1,
                     spans: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
    """:meth:`Codec.decode_mean <commpress.codecs.Codec.decode_mean>`: every payload checked,
    then as many leading values as the codec's one-pass kernel covers (``_decode_mean_body``;
    none without :class:`FusedMean`), the rest decoded payload by payload, in order."""
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
            data, _, _ = checked(codec, Payload(gathered[start:start + length]), torch.float32, numel)
        except ValueError as exc:
            raise PayloadError(index, str(exc)) from None
        bodies.append(data[HEADER_BYTES:])
    equal = len({length for _, length in spans}) == 1 and all(
        start == index * spans[0][1] for index, (start, _) in enumerate(spans))
    done = codec._decode_mean_body(gathered[: count * spans[0][1]].view(count, -1)[:, HEADER_BYTES:],
                                  out, local, rank) if numel and equal else 0
    if done == numel:
        return out
    share = 1.0 / count
    out[done:].zero_()
    for index, body in enumerate(bodies):
        try:  # a variable-length body's streams are checked as they are read
            if index == rank and local is not None:
                codec._decode_from(body, local, done)
                codec._store(local[done:], out[done:], share)
            else:
                codec._decode_from(body, out, done, share)
        except ValueError as exc:
            raise PayloadError(index, str(exc)) from None
    return out


class FusedMean:
    """Mixed into a :class:`~commpress.codecs.Codec` (see the module docstring)."""

    def _decode_mean_body(self, bodies: torch.Tensor, out: torch.Tensor,
                          local: Optional[torch.Tensor], rank: int) -> int:
        """:meth:`decode_mean` of the checked ``bodies`` (one per row) in one compiled kernel
        (:meth:`_mean_kernel_inputs`), over a leading part of the outputs: how many values it
        wrote (0: none, e.g. where compiling is off)."""
        if not (out.is_contiguous() and (local is None or local.is_contiguous())
                and kernels.usable(out.device, out.numel())):
            return 0
        prepared = self._mean_kernel_inputs(bodies, out.numel())
        if prepared is None:
            return 0
        inputs, rows, done = prepared
        count, rank = bodies.shape[0], -1 if local is None else rank
        outputs = [t[:done].view(rows, -1) for t in (out, local) if t is not None]
        ran = kernels.run(("decode_mean", repr(self), out.device.type, count, rank),
                          lambda: self._mean_kernel(count, rank), *inputs, *outputs) is not None
        return done if ran else 0

    def _mean_kernel_inputs(self, bodies: torch.Tensor, numel: int):
        """``(inputs, rows, done)``: the one-kernel :meth:`decode_mean`'s tensors for the first
        ``done`` values (a codec's kernel may cover whole blocks only), the last with one row
        per row of the outputs' first ``done`` values, which it views as ``rows`` rows; None
        where this codec has no such kernel."""
        return None

    def _payload_values(self, inputs, index: int) -> torch.Tensor:
        """Inside that kernel: payload ``index``'s fp32 values, shaped like the outputs."""
        raise NotImplementedError

    def _mean_kernel(self, count: int, rank: int):
        """The kernel: every payload's values times ``1 / count`` added in order to zero
        (:meth:`_store`'s rounding, as the eager path adds them), payload ``rank`` (unless -1)
        also written into a second output. ``count`` and ``rank`` are constants of the
        kernel (it is cached per both)."""
        share = 1.0 / count

        def mean(*args):
            inputs, outputs = args[:len(args) - 1 - (rank >= 0)], args[len(args) - 1 - (rank >= 0):]
            torch._check(outputs[0].shape[0] == inputs[-1].shape[0])  # sizes tied: no spill
            total = 0.0
            for index in range(count):
                values = self._payload_values(inputs, index)
                if index == rank:
                    outputs[1].copy_(values)
                total = total + values * share
            outputs[0].copy_(total)
            return outputs[0]
        return mean

