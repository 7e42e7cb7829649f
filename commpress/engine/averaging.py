"""How one gradient group is averaged over ranks under a choice of codec and collective, and
how the calibrated policy's candidates are timed on it.

The engine decides *which* choice a group gets (its policy) and *when* (its step sequence);
:class:`GroupAverager` carries the choice out, knowing codecs, collectives and transports.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from ..codecs import FP16, Identity
from ..comm.calibration import FP32, SAMPLE_NUMEL, Candidate
from ..comm.collectives import Channel, start_mean
from ..comm.masks import GradientMask
from ..comm.pipeline import Layout, reduce_gradient
from ..comm.segments import Segments
from ..config import CompressionConfig
from ..feedback import ErrorFeedback
from ..stats import CommStats
from .runtime import Runtime

_FP32, _FP16 = Identity(), FP16()


class Group(NamedTuple):
    """A front end's gradient group (a DDP bucket, a Horovod group, an MPI call's arrays): a
    flat ``buffer`` and the segments of it sent uncompressed (``small``) and through the
    codec (``big``), as ``(offset, numel, key)`` lists (see :func:`.reduction.split_segments`)."""

    buffer: torch.Tensor
    small: List[tuple]
    big: List[tuple]

    def sample(self) -> "Group":
        """The group itself, or for one of more than
        :data:`~commpress.comm.calibration.SAMPLE_NUMEL` values its first ones, with the
        segments cut to them (a cut segment's key stands in as a shape-only tensor, so a
        scratch error-feedback memory has the sample's size)."""
        cap = SAMPLE_NUMEL
        if self.buffer.numel() <= cap:
            return self

        def cut(segments):
            kept = []
            for offset, numel, key in segments:
                if offset + numel <= cap:
                    kept.append((offset, numel, key))
                elif offset < cap:
                    kept.append((offset, cap - offset, torch.empty(cap - offset, device="meta")))
            return kept
        return Group(self.buffer[:cap], cut(self.small), cut(self.big))


class GroupAverager:
    """Averages a :class:`Group` over ranks in place as a
    :class:`~commpress.comm.calibration.Candidate` says, sending only the entries ``mask``
    keeps. Error feedback applies to the configured codec only."""

    def __init__(self, config: CompressionConfig, mask: GradientMask):
        self.config, self.mask = config, mask

    def average(self, runtime: Runtime, group: Group, choice: Candidate,
                generator: Optional[torch.Generator], stats: Optional[CommStats],
                feedback: Optional[ErrorFeedback]) -> None:
        """The small segments in fp32, the large ones through the choice's codec and
        collective (everything in one fp32 all-reduce when the choice is fp32)."""
        buffer, small, big = group
        if choice == FP32:
            small, big = small + big, []
        small_done = None
        if small and big and buffer.dtype == torch.float32 and not self.mask:
            # on the wire while the large ones are encoded: a blocking all-reduce here would
            # hold back the first compressed piece by a round trip
            small_done = start_mean(Segments([buffer[o:o + n] for o, n, _ in small]), _FP32,
                                    runtime.transport, stats)
        elif small:
            self._segments_mean(buffer, small, Channel(_FP32, runtime.transport, generator, stats),
                                "allreduce", None)
        if big:
            own = choice.codec == "codec"
            transport = (runtime.compressed_transport
                         if choice.collective in ("auto", "hierarchical") else runtime.transport)
            self._segments_mean(buffer, big, Channel(self.config.codec if own else _FP16,
                                                     transport, generator, stats),
                                choice.collective, feedback if own else None)
        if small_done is not None:
            small_done()

    def _segments_mean(self, buffer: torch.Tensor, segments, channel: Channel, collective: str,
                       feedback: Optional[ErrorFeedback]) -> None:
        """Average the gradients of ``segments`` over ranks, where they lie in the buffer."""
        keys = [k for _, _, k in segments]
        reduce_gradient(Segments([buffer[o:o + n] for o, n, _ in segments]),
                        Layout(keys, keep=self.mask.kept_indices(keys, buffer.device)),
                        channel, collective=collective, feedback=feedback, agreed=True)

    def all_reduce(self, runtime: Runtime, buffer: torch.Tensor, choice: Candidate,
                   stats: CommStats) -> torch.futures.Future:
        """A future of ``buffer``'s mean under an all-reduce choice (fp32, fp16, a summable
        codec's wire dtype): one asynchronous all-reduce issued on this thread (see
        :meth:`Runtime.all_reduce_mean`), its bytes counted in ``stats``."""
        wire = (torch.float32 if choice == FP32 else
                _FP16.wire_dtype if choice.codec == "fp16" else self.config.codec.wire_dtype)
        w = runtime.transport.world_size
        stats.add(fp32_bytes=2 * (w - 1) * 4 * buffer.numel() // w,
                  wire_bytes=2 * (w - 1) * buffer.numel() * wire.itemsize // w)
        return runtime.all_reduce_mean(buffer, wire, stats)

    def calibrate(self, policy, runtime: Runtime, group: Group, options: List[Candidate]) -> None:
        """Let ``policy`` time every option on a copy of the group (or of its
        :meth:`~Group.sample`) for its pending plan. Candidates draw rounding noise from a
        generator of their own (the training's stream is untouched) and feed back into a
        scratch memory (so error feedback's cost is counted)."""
        sample = group.sample()
        scratch = Group(torch.empty_like(sample.buffer), sample.small, sample.big)
        config, device = self.config, group.buffer.device
        generator = torch.Generator(device=device) if config.codec.stochastic else None
        if generator is not None:
            generator.manual_seed(config.rank_seed(runtime.transport.rank))
        feedback = (ErrorFeedback(config.error_feedback, config.server_feedback)
                    if config.error_feedback else None)

        def run(choice):
            return lambda: self.average(runtime, scratch, choice, generator, None, feedback)
        policy.calibrate(group.buffer.numel(), options, run, runtime.control, device,
                         prepare=lambda: scratch.buffer.copy_(sample.buffer),
                         scale=group.buffer.numel() / sample.buffer.numel())
