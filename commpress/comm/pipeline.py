"""The reduction every front end runs: a gradient vector in, its mean over ranks out, through
a codec and a compressed collective, with error feedback and AC/DC masks around them.

The DDP hook, the MPI functions and the Horovod optimizer only gather their tensors into a
flat vector and call :func:`reduce_gradient`; what happens between is written once, here.
"""
from typing import NamedTuple, Optional, Sequence

import torch

from ..feedback import ErrorFeedback
from .collectives import (PIECEWISE, Channel, FeedbackBuffers, choose_algorithm, compressed_mean,
                          requantizes)
from .segments import Segments


class Layout(NamedTuple):
    """What a flat gradient vector holds: the gradients of ``keys`` end to end (error
    feedback keeps a memory per key), ``sizes`` their lengths (None: each key's ``numel()``),
    and ``keep``, the indices of the entries under an AC/DC mask (None: all)."""

    keys: Sequence
    sizes: Optional[Sequence[int]] = None
    keep: Optional[torch.Tensor] = None


def reduce_gradient(flat: torch.Tensor, layout: Layout, channel: Channel,
                    collective: str = "auto", feedback: Optional[ErrorFeedback] = None, *,
                    in_place: bool = False, agreed: bool = False) -> torch.Tensor:
    """The fp32 mean over ranks of ``flat`` (laid out as ``layout`` says) through ``channel``,
    with error feedback and, given ``layout.keep``, sending only the entries under the mask:
    the result is zero elsewhere. Every front end reduces through here.
    ``collective="auto"`` picks the algorithm with
    :func:`~commpress.comm.collectives.choose_algorithm`. ``in_place``: the mean may be
    written into ``flat`` (when it is fp32 and unmasked), which the caller gives up.

    ``flat`` may be :class:`~commpress.comm.segments.Segments` (views of a buffer, e.g. a DDP
    bucket's large gradients, one part per key): the mean is then written into them and they
    are returned. Unmasked, in fp32, under a piecewise algorithm, they are reduced where they
    lie (error feedback included); otherwise through one concatenated copy. ``agreed``: as
    :func:`~commpress.comm.collectives.compressed_mean`'s (front ends agree once per step)."""
    keys, sizes, keep = layout
    codec, transport = channel.codec, channel.transport
    if isinstance(flat, Segments):
        algorithm = (choose_algorithm(codec, flat.numel(), transport.world_size, transport.local_size)
                     if collective == "auto" else collective)
        if keep is not None or flat.dtype != torch.float32 or algorithm not in PIECEWISE:
            flat.assign(reduce_gradient(flat.concatenated(), layout, channel, collective,
                                        feedback, in_place=True, agreed=agreed))
            return flat
    if flat.dtype == torch.float64:  # codecs take fp32/fp16/bf16: float64 is reduced in fp32
        flat = flat.float()
    if keep is not None:  # the masked gradient: zero outside the mask
        flat = torch.zeros_like(flat).index_copy_(0, keep, flat.index_select(0, keep))
    sent = feedback.compensate(keys, flat, sizes, codec) if feedback else flat
    compact = sent if keep is None else sent.index_select(0, keep)
    algorithm = (choose_algorithm(codec, compact.numel(), transport.world_size, transport.local_size)
                 if collective == "auto" else collective)
    server = None
    if feedback and feedback.server and requantizes(algorithm, codec, compact.numel(), transport):
        # reduce_scatter updates it piece by piece: each parameter's memory where it lies
        server = (Segments(feedback.server_memories(keys, flat, sizes))
                  if keep is None and algorithm == "reduce_scatter" and keys else
                  feedback.server_memory(keys, flat))
    server_compact = server if keep is None or server is None else server.index_select(0, keep)
    out = flat if isinstance(flat, Segments) or (
        in_place and keep is None and flat.dtype == torch.float32) else None
    # what was sent is needed only until it is encoded: EF's next memory p - C(p), or EF21's
    # own contribution C(p), takes its place piece by piece
    keeps_local = feedback is not None and feedback.keeps_local
    residual_in_place = feedback is not None and feedback.residual_in_place
    local_out = compact if keeps_local and keep is None and algorithm in PIECEWISE else None
    mean, local = compressed_mean(compact, channel, algorithm, out=out, keep_local=keeps_local,
                                  feedback=FeedbackBuffers(
                                      local_out, compact if residual_in_place else None,
                                      server_compact), agreed=agreed)
    if keep is not None:
        mean = torch.zeros_like(flat, dtype=torch.float32).index_copy_(0, keep, mean)
        if local is not None:
            local = torch.zeros_like(mean).index_copy_(0, keep, local)
        if residual_in_place:  # outside the mask what was sent (the memory) is what remains
            sent.index_copy_(0, keep, compact)
        if server is not None:
            server.index_copy_(0, keep, server_compact)
    if feedback:
        mean = feedback.update(keys, sent, local, mean, sizes)
        if not isinstance(server, Segments):  # Segments: updated where they lie
            feedback.store_server_memory(keys, server)
    return mean
