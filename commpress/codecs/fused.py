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

from typing import Optional

import torch

from . import kernels


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

