"""The reduction every front end runs: a gradient vector in, its mean over ranks out, through
a codec and a compressed collective, with error feedback and AC/DC masks around them.

The DDP hook, the MPI functions and the Horovod optimizer only gather their tensors into a
flat vector and call :func:`reduce_gradient`; what happens between is written once, here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..codecs import Codec
from ..feedback import ErrorFeedback
from ..stats import CommStats
from .collectives import PIECEWISE, choose_algorithm, compressed_mean, requantizes
from .segments import Segments
from .transport import Transport


def reduce_gradient(flat: torch.Tensor, keys: Sequence, codec: Codec, transport: Transport,
                collective: str = "auto", feedback: Optional[ErrorFeedback] = None,
                generator: Optional[torch.Generator] = None, stats: Optional[CommStats] = None,
                keep: Optional[torch.Tensor] = None, sizes=None, in_place: bool = False,
                agreed: bool = False) -> torch.Tensor:
    """The fp32 mean over ranks of ``flat`` (the gradients of ``keys``, concatenated), with
    error feedback and, given ``keep`` (indices of the entries under an AC/DC mask), sending
    only those entries: the result is zero elsewhere. Every front end reduces through here.
    ``collective="auto"`` picks the algorithm with
    :func:`~commpress.comm.collectives.choose_algorithm`. ``in_place``: the mean may be
    written into ``flat`` (when it is fp32 and unmasked), which the caller gives up.

    ``flat`` may be :class:`~commpress.comm.segments.Segments` (views of a buffer, e.g. a DDP
    bucket's large gradients, one part per key): the mean is then written into them and they
    are returned. Unmasked, in fp32, under a piecewise algorithm, they are reduced where they
    lie (error feedback included); otherwise through one concatenated copy. ``agreed``: as
    :func:`~commpress.comm.collectives.compressed_mean`'s (front ends agree once per step)."""
    if isinstance(flat, Segments):
        algorithm = (choose_algorithm(codec, flat.numel(), transport.world_size, transport.local_size)
                     if collective == "auto" else collective)
        if keep is not None or flat.dtype != torch.float32 or algorithm not in PIECEWISE:
            flat.assign(reduce_gradient(flat.concatenated(), keys, codec, transport, collective,
                                        feedback, generator, stats, keep, sizes, in_place=True,
                                        agreed=agreed))
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
    mean, local = compressed_mean(compact, codec, transport, algorithm, generator, stats,
                                  keep_local=keeps_local,
                                  server_residual=server_compact, out=out, local_out=local_out,
                                  residual_out=compact if residual_in_place else None,
                                  agreed=agreed)
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
