"""Compressed mean-reductions, each algorithm written once over a :class:`Transport`.

``compressed_mean(flat, Channel(codec, transport), algorithm)`` returns the fp32 mean over
ranks of ``flat`` (bit-identical on every rank) and, with ``keep_local=True``, what this rank's
own contribution became after compression (what EF21 needs; plain EF asks for ``flat`` minus
it, written over ``flat``, with ``residual_out``). It blocks; front ends run it on a worker
thread (:mod:`commpress.engine.runtime`) to overlap it with computation.

Algorithms (wire bytes per rank for a vector whose payload is ``B`` bytes):

- ``allgather``: everyone's payload to everyone, decode all W, average. ``(W-1) * B``.
  Vectors over ``PIPELINE_ELEMENTS`` go in pieces, each its own payload, so that encoding
  the next piece and decoding the previous one overlap the wire (engines with asynchronous
  collectives; the others run the pieces one after the other). ``reduce_scatter`` does the
  same with pieces of ``PIPELINE_ELEMENTS`` per rank.
- ``reduce_scatter``: split into W chunks aligned to the codec's block, ``all_to_all`` the
  encoded chunks, each rank decodes and averages its chunk, re-encodes it, ``all_gather`` of the
  reduced chunks. About ``2(W-1)/W * B``, flat in W like a ring allreduce, at the price of a
  second quantization of the averaged chunk.
- ``allreduce``: for summable encodings (fp32/fp16/bf16 casts) a plain all_reduce of the cast,
  pre-divided by W (as PyTorch's fp16 hook) so the sum cannot overflow. ``2(W-1)/W * B``.
- ``hierarchical`` (a :class:`~commpress.comm.transport.HierarchicalTransport`, N nodes of L
  ranks): an uncompressed fp32 reduce-scatter inside the node (fast links), the compressed
  collective chosen for N ranks on this rank's 1/L shard among the ranks with the same local
  index on the other nodes, and an fp32 all-gather of the reduced shards inside the node. Out
  of each node go about ``2(N-1)/N * B`` (its L ranks each send their shard's share), where a
  flat reduce_scatter over all ``W = N*L`` ranks sends every rank's ``(W-L)/W * B`` to other
  nodes in each of its two rounds: about twice as much for 2 nodes of 2 ranks. Inside the node
  each rank sends ``2(L-1)/L * 4n`` bytes of fp32.
"""
import math
import time
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ..codecs import Codec, Payload, PayloadError, contractive_factor, kernels
from ..codecs.wire import FORMAT_VERSION
from ..config import ALGORITHMS
from ..finite import keep_finite
from ..stats import CommStats
from .agreement import agree
from .segments import Segments, destination, window
from .transport import HierarchicalTransport, Transport

#: the algorithms that read and write a vector only piece by piece, so that it may be
#: :class:`Segments` (allreduce casts slice by slice into and out of its one wire buffer)
PIECEWISE = ("allgather", "reduce_scatter", "allreduce")
#: below this many payload bytes a collective is latency-bound: one round beats two
SMALL_PAYLOAD_BYTES = 64 * 1024
#: a dividing cast into fp16/bf16 runs in slices of this many elements: its fp32 temporary
CAST_SLICE = 1 << 18
#: allgather sends vectors in pieces of this many elements, overlapping codec work and wire
PIPELINE_ELEMENTS = 1 << 20


def wire_bytes_per_rank(algorithm: str, codec: Codec, numel: int, world_size: int,
                        local_size: int = 1) -> float:
    """Bytes rank 0 sends for one vector of ``numel`` elements, under the algorithms above
    (``local_size``: ranks per node, for ``hierarchical``)."""
    w = world_size
    if algorithm == "allgather":
        return (w - 1) * sum(codec.wire_bytes(hi - lo) for lo, hi in pipeline_pieces(numel, codec.block_size))
    if algorithm == "reduce_scatter":
        total = 0
        for lo, hi in pipeline_pieces(numel, codec.block_size, PIPELINE_ELEMENTS * w):
            chunks = [b - a for a, b in chunk_bounds(hi - lo, codec.block_size, w)]
            mine = max(chunks)  # the all_gather's slot also carries a status byte
            total += (sum(codec.wire_bytes(c) for c in chunks) - codec.wire_bytes(chunks[0])
                      + (w - 1) * (codec.wire_bytes(mine) + 1))
        return total
    if algorithm == "allreduce":
        return 2 * (w - 1) / w * numel * _wire_dtype(codec).itemsize
    if algorithm == "hierarchical":
        shards = [hi - lo for lo, hi in chunk_bounds(numel, codec.block_size, local_size)]
        nodes = w // local_size
        inner = choose_algorithm(codec, max(shards), nodes)
        return ((numel - shards[0] + (local_size - 1) * (max(shards) + 1)) * 4
                + wire_bytes_per_rank(inner, codec, max(shards), nodes))
    raise ValueError(f"unknown collective {algorithm!r}; choose from {ALGORITHMS}")


def choose_algorithm(codec: Codec, numel: int, world_size: int, local_size: int = 1) -> str:
    """The ``auto`` cost model (``local_size``: ranks per node, when known).

    - Summable codecs (fp32/fp16/bf16): ``allreduce``, which no compressed scheme beats for them.
    - Payloads under ``SMALL_PAYLOAD_BYTES`` are latency-bound: ``allgather``, one round.
    - Several nodes of several ranks: ``hierarchical``, which keeps the uncompressed traffic on
      the fast node-local links and halves (or better) what crosses the network.
    - Otherwise the algorithm with the fewest bytes per rank: ``allgather`` sends ``(W-1)B``,
      ``reduce_scatter`` about ``2(W-1)/W B``, so they tie at ``W = 2`` and reduce_scatter wins
      beyond. Ties go to ``allgather``, which also quantizes only once (less noise).
    """
    if codec.summable:
        return "allreduce"
    if codec.wire_bytes(numel) < SMALL_PAYLOAD_BYTES:
        return "allgather"
    if 1 < local_size < world_size:
        return "hierarchical"
    return "allgather" if world_size <= 2 else "reduce_scatter"


def requantizes(algorithm: str, codec: Codec, numel: int, transport: Transport) -> bool:
    """Whether ``algorithm`` quantizes averaged values a second time on this rank (where a
    server residual applies): ``reduce_scatter``, and ``hierarchical`` when its collective
    across nodes is one. The others leave a server residual untouched."""
    if algorithm == "hierarchical" and isinstance(transport, HierarchicalTransport):
        lo, hi = chunk_bounds(numel, codec.block_size, transport.local_size)[transport.intra.rank]
        return choose_algorithm(codec, hi - lo, transport.nodes) == "reduce_scatter"
    return algorithm == "reduce_scatter"


def chunk_bounds(numel: int, block: int, world_size: int):
    """W contiguous ``(lo, hi)`` ranges covering ``numel``, starting at multiples of ``block``
    (so no codec bucket straddles two ranks); trailing ones may be empty."""
    per_rank = math.ceil(math.ceil(numel / block) / world_size) * block
    return [(min(r * per_rank, numel), min((r + 1) * per_rank, numel)) for r in range(world_size)]


def pipeline_pieces(numel: int, block: int, elements: Optional[int] = None):
    """``(lo, hi)`` pieces covering ``numel``, aligned to ``block``, each its own payload: as
    many as pieces of ``elements`` (default: ``PIPELINE_ELEMENTS`` as it is at the call) need,
    of equal sizes (to a block), so that no short last piece is left: one under the fused
    kernels' threshold ran the eager codec (25 MB: a 250K-value tail took 3.9 ms of a 20 ms
    all-gather at 10 Gbit/s). One piece, possibly empty, for small vectors."""
    size = max((elements or PIPELINE_ELEMENTS) // block, 1) * block
    count = max(-(-numel // size), 1)
    blocks = -(-numel // block)
    bounds = [min(blocks * k // count * block, numel) for k in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class Channel(NamedTuple):
    """How one rank's vectors travel: through ``codec``, over ``transport``, with rounding
    noise from ``generator`` (None: PyTorch's default one; deterministic codecs draw none), counted
    into ``stats`` (None: not counted)."""

    codec: Codec
    transport: Transport
    generator: Optional[torch.Generator] = None
    stats: Optional[CommStats] = None


def _piece(vector: Optional[torch.Tensor], lo: int, hi: int) -> Optional[torch.Tensor]:
    return None if vector is None else vector[lo:hi]


def _wire_dtype(codec: Codec) -> torch.dtype:
    if not codec.summable:
        raise ValueError(f"collective 'allreduce' needs a summable codec (identity, fp16, bf16), "
                         f"not {codec!r}: its payloads cannot be added")
    return codec.wire_dtype


class _Timer:
    def __init__(self, stats: Optional[CommStats], field: str):
        self.stats, self.field = stats, field

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.stats is not None:
            self.stats.add(**{self.field: time.perf_counter() - self.start})


def _decode(codec: Codec, data: torch.Tensor, numel: int, peer: int,
            into: Optional[torch.Tensor] = None, alpha: Optional[float] = None) -> torch.Tensor:
    """``data`` decoded (fp32), or written into ``into`` (added times ``alpha``, given one);
    refusing a payload of another length than this rank's: a peer reducing a different
    tensor must fail the step, not be averaged in."""
    try:
        if into is not None:
            return codec.decode_into(Payload(data), into, alpha)
        return codec.decode(Payload(data), dtype=torch.float32, numel=numel)
    except ValueError as exc:
        raise _peer_error(peer, exc) from None


def _peer_error(peer: int, reason) -> ValueError:
    return ValueError(f"commpress: rank {peer} of the group sent a payload this rank cannot take "
                      f"({reason}): the ranks are not reducing the same tensors (different "
                      f"models, or a different bucket layout)")


def _decode_mean(channel: Channel, gathered: torch.Tensor, mean: torch.Tensor,
                 local: Optional[torch.Tensor] = None, spans=None) -> None:
    """Write into ``mean`` the average of the group's payloads in ``gathered``, one per rank
    (:meth:`Codec.decode_mean`: straight into the sum, no full-size temporary per payload;
    ``spans`` places variable-length ones). With ``local``, this rank's payload is also
    decoded there (error feedback needs it)."""
    transport = channel.transport
    with _Timer(channel.stats, "decode_seconds"):
        try:
            channel.codec.decode_mean(gathered, transport.world_size, mean, local,
                                      transport.rank if local is not None else -1, spans)
        except PayloadError as exc:
            raise _peer_error(exc.index, exc.reason) from None


class FeedbackBuffers(NamedTuple):
    """What error feedback asks :func:`compressed_mean` to keep besides the mean.

    ``local``: where to write this rank's compressed contribution (implies ``keep_local``),
    which may be ``flat`` itself under the ``PIECEWISE`` algorithms (each piece is encoded
    before its part of ``local`` is written): EF21, which no longer needs what it sent once it
    is encoded, so keeps its own contribution with no full-size buffer of its own.

    ``residual``: where to write ``flat`` minus this rank's compressed contribution (plain
    error feedback's next memory ``p - C(p)``), instead of ``local``; it may be ``flat``
    itself. Each piece's is written once the piece is encoded, by decoding its payload into
    it with weight -1 (the same bits as subtracting ``local``), so error feedback needs no
    full-size buffer for its own contribution.

    ``server``: an fp32 vector like ``flat``, the error feedback of the second quantization
    in ``reduce_scatter`` (DeepSpeed's "server error"): this rank adds its chunk of it to the
    averaged chunk before re-encoding, and stores there what re-encoding lost. Other
    algorithms quantize once and leave it untouched."""

    local: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    server: Optional[torch.Tensor] = None

    def piece(self, lo: int, hi: int,
              server: Optional[torch.Tensor] = None) -> "FeedbackBuffers":
        """The buffers of ``flat[lo:hi]``; ``server`` as given (the caller windows it)."""
        return FeedbackBuffers(_piece(self.local, lo, hi), _piece(self.residual, lo, hi), server)


def compressed_mean(flat: torch.Tensor, channel: Channel, algorithm: str, *,
                    out: Optional[torch.Tensor] = None, keep_local: bool = False,
                    feedback: Optional[FeedbackBuffers] = None, agreed: bool = False
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(mean, local)``: the fp32 mean over ranks of the 1-D ``flat`` through ``channel``,
    and (``keep_local``) this rank's compressed contribution, decoded. See the module
    docstring; ``feedback`` (:class:`FeedbackBuffers`): where error feedback's vectors go.

    ``agreed``: the caller has checked that every rank reduces alike (the front ends do, once
    per step or call). Otherwise ranks first agree on length, codec and algorithm (one 8-byte
    all-gather): vectors of different lengths would make collectives of different sizes,
    which gloo answers by aborting the process.

    ``out``: an fp32 vector like ``flat`` to write the mean into, which may be ``flat`` itself
    (every piece is read before its mean is written): the DDP hook averages a bucket in place,
    with no full-size buffer beyond the error-feedback ones. ``out`` may be :class:`Segments`
    (a bucket's large gradients where they lie) for the ``PIECEWISE`` algorithms, and then
    ``flat`` too, reduced in place (``out=flat``)."""
    if flat.dim() != 1:
        raise ValueError(f"compressed_mean takes a flat tensor, got shape {tuple(flat.shape)}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown collective {algorithm!r}; choose from {ALGORITHMS}")
    feedback = feedback or FeedbackBuffers()
    local_out, residual_out, server_residual = feedback
    for name, given in (("out", out), *((f"feedback.{field}", getattr(feedback, field))
                                        for field in FeedbackBuffers._fields)):
        if given is not None and (given.shape != flat.shape or given.dtype != torch.float32):
            raise ValueError(f"{name} must be float32 of shape {tuple(flat.shape)}, got "
                             f"{given.dtype} of shape {tuple(given.shape)}")
    if isinstance(flat, Segments) and out is not flat:
        raise ValueError("Segments are reduced in place: pass out=flat")
    if isinstance(out, Segments) and algorithm not in PIECEWISE:
        raise ValueError(f"Segments are reduced in place by {PIECEWISE}, not {algorithm!r}")
    if local_out is not None and (isinstance(local_out, Segments) or algorithm not in PIECEWISE):
        raise ValueError(f"feedback.local must be a tensor and the algorithm one of {PIECEWISE}, "
                         f"got {type(local_out).__name__} and {algorithm!r}")
    if residual_out is not None and (isinstance(residual_out, Segments) or keep_local
                                     or local_out is not None):
        raise ValueError("feedback.residual must be a tensor, and replaces keep_local and "
                         "feedback.local (it holds flat minus what they would hold)")
    if isinstance(server_residual, Segments) and algorithm != "reduce_scatter":
        raise ValueError(f"a server residual in Segments is updated piecewise by reduce_scatter, "
                         f"not {algorithm!r}")
    codec, transport = channel.codec, channel.transport
    if algorithm == "hierarchical" and not isinstance(transport, HierarchicalTransport):
        raise ValueError("collective 'hierarchical' needs a HierarchicalTransport (ranks grouped "
                         f"by node), got {type(transport).__name__}")
    if not agreed:
        agree(transport, {"call": "compressed_mean", "numel": flat.numel(), "codec": repr(codec),
                          "algorithm": algorithm, "wire_format": FORMAT_VERSION},
              getattr(transport, "device", torch.device("cpu")))
    if out is None:
        out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    local = local_out if local_out is not None else (
        torch.empty(out.shape, dtype=torch.float32, device=out.device) if keep_local else None)
    before, intra_before = transport.sent_bytes, transport.intra_node_bytes
    started = time.perf_counter()
    with kernels.reducing(flat.numel()):  # its pieces and chunks take the compiled kernels
        _run(algorithm, flat, channel, out, feedback._replace(local=local))
    _count_wire(channel, before, intra_before, started)
    return out, local


def _count_wire(channel: Channel, before: int, intra_before: int, started: float) -> None:
    """Add what the transport sent since ``before`` and the time since ``started`` to the
    channel's statistics."""
    transport = channel.transport
    if channel.stats is not None:
        channel.stats.add(wire_bytes=transport.sent_bytes - before,
                          intra_node_bytes=transport.intra_node_bytes - intra_before,
                          comm_seconds=time.perf_counter() - started)


def _run(algorithm: str, flat: torch.Tensor, channel: Channel, out: torch.Tensor,
         feedback: FeedbackBuffers) -> None:
    """Write the mean into ``out`` and error feedback's vectors into the ``feedback`` buffers
    given (``local`` here is where this rank's contribution goes, whether kept for the caller
    or for error feedback)."""
    if algorithm == "hierarchical":
        return _hierarchical(flat, channel, out, feedback)
    if algorithm == "allreduce":
        for _ in _allreduce(flat, channel.codec, channel.transport, out, feedback.local,
                            feedback.residual):
            pass
        return None
    if algorithm == "allgather":
        def stages(lo, hi):
            into, commit = destination(out, lo, hi)
            yield from _allgather_piece(flat[lo:hi], channel, into, feedback.piece(lo, hi))
            commit()
        pieces = pipeline_pieces(flat.numel(), channel.codec.block_size)
    else:
        def stages(lo, hi):
            server, keep_server = (None, None) if feedback.server is None else \
                window(feedback.server, lo, hi)
            into, commit = destination(out, lo, hi)
            yield from _reduce_scatter_piece(flat[lo:hi], channel, into,
                                             feedback.piece(lo, hi, server))
            commit()
            if keep_server is not None:
                keep_server()
        pieces = pipeline_pieces(flat.numel(), channel.codec.block_size,
                                 PIPELINE_ELEMENTS * channel.transport.world_size)
    _pipelined(pieces, stages)


def start_mean(flat: torch.Tensor, codec: Codec, transport: Transport,
               stats: Optional[CommStats] = None) -> Callable[[], None]:
    """The mean over ranks of ``flat`` (fp32, a tensor or :class:`Segments`) through a
    summable ``codec``'s all-reduce, written into ``flat`` once the returned function is
    called. When this returns the all-reduce is on the wire, so a caller can reduce another
    vector meanwhile: the DDP hook sends a bucket's small fp32 gradients alongside its
    compressed ones instead of before them. Collectives started after it must be started in
    the same order on every rank, as always."""
    if flat.dim() != 1 or flat.dtype != torch.float32:
        raise ValueError(f"start_mean takes a flat float32 vector, got {flat.dtype} of shape "
                         f"{tuple(flat.shape)}")
    before = transport.sent_bytes
    stages = _allreduce(flat, codec, transport, flat, None)
    next(stages)
    if stats is not None:
        stats.add(wire_bytes=transport.sent_bytes - before)
    return lambda: next(stages, None)


def _allreduce(flat, codec, transport, out, local, residual=None):
    """A generator (see :func:`_pipelined`): yields once the all-reduce is started. Divide
    and cast in one pass into one buffer: ``out`` itself for fp32 (in place, as PyTorch's
    allreduce hook), else one of the wire dtype (or fp32 when ``out`` is Segments: one
    collective needs one contiguous buffer); casts and Segments go slice by slice, so that
    only a slice-sized temporary is made."""
    dtype = _wire_dtype(codec)
    segmented = isinstance(out, Segments)
    wire = (out if dtype == out.dtype and not segmented
            else torch.empty(flat.shape, dtype=dtype, device=flat.device))
    step = CAST_SLICE if dtype != flat.dtype or segmented else max(flat.numel(), 1)
    for lo in range(0, flat.numel(), step):
        torch.div(flat[lo:lo + step], transport.world_size, out=wire[lo:lo + step])
    if local is not None:
        torch.mul(wire, transport.world_size, out=local)
    if residual is not None:  # slice by slice: a slice-sized temporary
        for lo in range(0, flat.numel(), CAST_SLICE):
            hi = lo + CAST_SLICE
            torch.sub(flat[lo:hi], wire[lo:hi] * transport.world_size, out=residual[lo:hi])
    pending = transport.all_reduce_sum_start(wire)
    yield
    total = pending.wait()
    if total is out:
        return
    for lo in range(0, flat.numel(), step):  # cast back into the parts where they lie
        hi = min(lo + step, flat.numel())
        into, commit = destination(out, lo, hi)
        into.copy_(total[lo:hi])
        commit()


def _pipelined(pieces, stages) -> None:
    """Run ``stages(lo, hi)`` for every piece with several pieces in flight. Each is a
    generator that yields right after starting a collective and writes its piece's results
    when it ends. A new piece starts, then every older one advances one stage, oldest first:
    while one piece's bytes are on the wire this thread encodes the next and decodes an
    earlier one. The schedule depends only on the number of pieces, so every rank issues its
    collectives in the same order."""
    def advance(stage):
        return next(stage, StopIteration) is not StopIteration

    active = []  # generators, oldest first
    for lo, hi in pieces:
        stage = stages(lo, hi)
        fresh = [stage] if advance(stage) else []
        active = [g for g in active if advance(g)] + fresh
    while active:
        active = [g for g in active if advance(g)]


def _subtract_own(codec: Codec, payload: Payload, flat: torch.Tensor, residual: torch.Tensor) -> None:
    """``residual = flat - decode(payload)``, ``residual`` possibly ``flat`` itself: decoded
    into it with weight -1, bit for bit ``flat - local``."""
    if residual.data_ptr() != flat.data_ptr():
        residual.copy_(flat)
    codec.decode_into(payload, residual, -1.0)


def exchange_sizes(transport: Transport, sizes, device: torch.device):
    """Every rank's list of ``sizes`` (one row per rank, each as long as this rank's): what
    its variable-length payloads take, known to all before they move (one small all-gather)."""
    mine = torch.tensor(sizes, dtype=torch.int64, device=device)
    return transport.all_gather(mine).view(transport.world_size, len(sizes)).tolist()


def _in_slots(codec: Codec, transport: Transport, data: torch.Tensor):
    """``(data, spans)`` for an all-gather of one payload per rank: a variable-length payload
    zero-padded to the largest of the group (all-gathers move equal sizes) and each rank's
    ``(start, length)`` in the gathered bytes; a fixed-width one as it is (spans None)."""
    if not codec.variable_length:
        return data, None
    sizes = [row[0] for row in exchange_sizes(transport, [data.numel()], data.device)]
    slot = max(sizes)
    padded = torch.zeros(slot, dtype=torch.uint8, device=data.device)
    padded[: data.numel()] = data
    return padded, [(r * slot, size) for r, size in enumerate(sizes)]


def _allgather_piece(flat: torch.Tensor, channel: Channel, out: torch.Tensor,
                     feedback: FeedbackBuffers):
    codec, transport = channel.codec, channel.transport
    with _Timer(channel.stats, "encode_seconds"):
        payload = codec.encode(flat, channel.generator)
    data, spans = _in_slots(codec, transport, payload.data)
    pending = transport.all_gather_start(data)
    if feedback.residual is not None:  # while the payloads are on the wire
        _subtract_own(codec, payload, flat, feedback.residual)
    yield
    _decode_mean(channel, pending.wait(), out, feedback.local, spans)


def _received_spans(codec: Codec, transport: Transport, sizes, device: torch.device):
    """``(receive sizes, spans)`` of an all-to-all in which this rank sends ``sizes[r]`` bytes
    to rank ``r``: for fixed-width payloads every rank sends this rank's own size (spans
    None); variable-length ones exchange their sizes first."""
    w, rank = transport.world_size, transport.rank
    if not codec.variable_length:
        return [sizes[rank]] * w, None
    received = [row[rank] for row in exchange_sizes(transport, sizes, device)]
    starts = [sum(received[:r]) for r in range(w)]
    return received, list(zip(starts, received))


def _reduce_scatter_piece(flat: torch.Tensor, channel: Channel, out: torch.Tensor,
                          feedback: FeedbackBuffers):
    codec, transport, generator, stats = channel
    local, residual, server_residual = feedback
    w, rank = transport.world_size, transport.rank
    bounds = chunk_bounds(flat.numel(), codec.block_size, w)
    with _Timer(stats, "encode_seconds"):
        payloads = [codec.encode(flat[lo:hi], generator) for lo, hi in bounds]
    sizes = [p.nbytes for p in payloads]
    received, spans = _received_spans(codec, transport, sizes, flat.device)
    pending = transport.all_to_all_start(torch.cat([p.data for p in payloads]), sizes, received)
    if residual is not None:  # while the chunks are on the wire
        for payload, (a, b) in zip(payloads, bounds):
            _subtract_own(codec, payload, flat[a:b], residual[a:b])
    yield
    lo, hi = bounds[rank]
    chunk_mean = torch.empty(hi - lo, dtype=torch.float32, device=flat.device)
    try:  # this rank's own chunk is decoded into local along with the peers'
        _decode_mean(channel, pending.wait(), chunk_mean, _piece(local, lo, hi), spans)
        failure = None
    except ValueError as exc:  # still take part in the all_gather, or the others would hang
        chunk_mean.fill_(float("nan"))
        failure = exc
    if local is not None and failure is None:
        for r, (payload, (a, b)) in enumerate(zip(payloads, bounds)):
            if r != rank:
                codec.decode_into(payload, local[a:b])
    if server_residual is None:
        with _Timer(stats, "encode_seconds"):
            reduced = codec.encode(chunk_mean, generator).data
    else:  # EF at the server, made contractive (see contractive_factor)
        chunk_mean += server_residual[lo:hi]
        to_send = chunk_mean * contractive_factor(codec, chunk_mean)
        with _Timer(stats, "encode_seconds"):
            reduced = codec.encode(to_send, generator).data
        # what re-encoding lost, computed in to_send's storage: no chunk-sized temporaries
        lost = torch.sub(chunk_mean, codec.decode_into(Payload(reduced), to_send), out=to_send)
        keep_finite(lost, server_residual[lo:hi])
        del to_send, lost
    del chunk_mean  # not needed while the all_gather is in flight (the next piece's is)
    # all_gather needs equal sizes: every reduced chunk travels in a slot of the largest size,
    # plus a byte saying whether its rank received a payload of the wrong length
    # (variable-length chunks: their sizes exchanged first)
    reduced_sizes = sizes if not codec.variable_length else \
        [row[0] for row in exchange_sizes(transport, [reduced.numel()], flat.device)]
    slot = max(reduced_sizes)
    padded = torch.zeros(slot + 1, dtype=torch.uint8, device=flat.device)
    padded[:reduced.numel()] = reduced
    padded[slot] = failure is not None
    pending = transport.all_gather_start(padded)
    yield
    gathered = pending.wait()
    _raise_if_failed(failure, gathered.view(w, slot + 1)[:, slot])
    gathered = gathered.view(w, slot + 1)[:, :slot].reshape(-1)
    with _Timer(stats, "decode_seconds"):
        for r, (a, b) in enumerate(bounds):
            _decode(codec, gathered[r * slot: r * slot + reduced_sizes[r]], b - a, r, into=out[a:b])


def node_mean_of_chunks(flat: torch.Tensor, transport: HierarchicalTransport) -> torch.Tensor:
    """The first hop of a node-aware reduce-scatter (the shape of ZeRO++'s qgZ), inside the
    node and uncompressed (in ``flat``'s dtype, so FSDP's bf16 reduce dtype halves it).

    ``flat`` holds W equal chunks, chunk ``r`` for flat rank ``r``. A rank with local index
    ``l`` receives from every rank of its node the chunks owned by the ranks with local index
    ``l`` on each node, and returns their mean over the node in fp32: N chunks, in node order.
    :func:`compressed_reduce_scatter` of that over ``transport.inter`` (the second hop, across
    nodes) gives this rank its own chunk of the mean over all W ranks; what crosses the
    network is then ``N - 1`` compressed chunks per rank instead of ``W - 1``."""
    local, nodes, w = transport.local_size, transport.nodes, transport.world_size
    if flat.dim() != 1 or flat.numel() % w:
        raise ValueError(f"node_mean_of_chunks takes a flat tensor of W={w} equal chunks, got "
                         f"shape {tuple(flat.shape)}")
    n = flat.numel() // w
    index = transport.owner_index.get(flat.device)
    if index is None:  # made once per device: no host-to-device copy per call
        owners = [transport.layout[node][peer] for peer in range(local) for node in range(nodes)]
        index = transport.owner_index[flat.device] = torch.tensor(owners, device=flat.device)
    send = flat.view(w, n).index_select(0, index).reshape(-1).view(torch.uint8)
    size = nodes * n * flat.element_size()  # moved as bytes: any dtype the transport carries
    received = transport.intra.all_to_all(send, [size] * local, [size] * local)
    # scaled before summing: fp16/bf16 sums cannot overflow
    return received.view(flat.dtype).view(local, nodes * n).float().div_(local).sum(0)


def compressed_reduce_scatter(flat: torch.Tensor, channel: Channel, *,
                              out: Optional[torch.Tensor] = None,
                              residual_out: Optional[torch.Tensor] = None,
                              agreed: bool = False) -> torch.Tensor:
    """This rank's chunk of the fp32 mean over ranks of ``flat``, which holds W equal chunks
    end to end, chunk ``r`` for rank ``r`` (FSDP's reduce-scatter input). Each rank encodes
    its W chunks, one all-to-all moves them, and each decodes the W payloads of its own chunk
    in rank order into ``out`` (fp32, ``numel / W`` values), so every rank's chunk has the same
    bits whatever the order payloads arrived in. One quantization per value. Pipelined in
    pieces along the chunk, as the other collectives are.

    ``residual_out``: where to write ``flat`` minus what this rank's payloads decode to (plain
    error feedback's next memory); it may be ``flat`` itself. ``agreed``: as
    :func:`compressed_mean`'s."""
    codec, transport, generator, stats = channel
    w = transport.world_size
    if flat.dim() != 1 or flat.numel() % w:
        raise ValueError(f"compressed_reduce_scatter takes a flat tensor of W={w} equal chunks, "
                         f"got shape {tuple(flat.shape)}")
    n = flat.numel() // w
    for name, given, numel in (("out", out, n), ("residual_out", residual_out, flat.numel())):
        if given is not None and (given.shape != (numel,) or given.dtype != torch.float32):
            raise ValueError(f"{name} must be float32 of shape ({numel},), got {given.dtype} of "
                             f"shape {tuple(given.shape)}")
    if not agreed:
        agree(transport, {"call": "compressed_reduce_scatter", "numel": flat.numel(),
                          "codec": repr(codec), "wire_format": FORMAT_VERSION},
              getattr(transport, "device", torch.device("cpu")))
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=flat.device)
    chunks = flat.view(w, n)
    residual = None if residual_out is None else residual_out.view(w, n)
    before, intra_before = transport.sent_bytes, transport.intra_node_bytes
    started = time.perf_counter()

    def stages(lo, hi):
        with _Timer(stats, "encode_seconds"):
            payloads = [codec.encode(chunks[r, lo:hi], generator) for r in range(w)]
        sizes = [p.nbytes for p in payloads]
        received, spans = _received_spans(codec, transport, sizes, flat.device)
        pending = transport.all_to_all_start(torch.cat([p.data for p in payloads]), sizes, received)
        if residual is not None:  # while the chunks are on the wire
            for r, payload in enumerate(payloads):
                _subtract_own(codec, payload, chunks[r, lo:hi], residual[r, lo:hi])
        yield
        _decode_mean(channel, pending.wait(), out[lo:hi], spans=spans)

    with kernels.reducing(flat.numel()):
        _pipelined(pipeline_pieces(n, codec.block_size), stages)
    _count_wire(channel, before, intra_before, started)
    return out


def _raise_if_failed(failure: Optional[Exception], statuses: torch.Tensor) -> None:
    """Every rank fails when any did: ``statuses`` are the ranks' failure flags. On an
    accelerator they are not read (a device->host copy would stall the hook on every bucket):
    there the ranks' layouts were checked before the step (the configuration agreement, on a
    CPU group), the failing rank raises, and its chunk, sent as NaN, is NaN on every peer."""
    if failure is not None:
        raise failure
    if statuses.device.type != "cpu":
        return
    failed = statuses.nonzero().view(-1).tolist()
    if failed:
        raise ValueError(f"commpress: rank(s) {failed} of the group received payloads of the wrong "
                         f"length: the ranks are not reducing the same tensors (different "
                         f"models, or a different bucket layout)")


def _hierarchical(flat: torch.Tensor, channel: Channel, out: torch.Tensor,
                  feedback: FeedbackBuffers) -> None:
    """See the module docstring. ``local`` (for error feedback) is ``flat`` except on this
    rank's shard, which carries L times what compressing the node's mean of it lost: averaged
    over the node's ranks, the residuals then add up to exactly the node's loss."""
    codec, transport = channel.codec, channel.transport
    local, residual, server_residual = feedback
    intra, inter = transport.intra, transport.inter
    size, rank = intra.world_size, intra.rank
    bounds = chunk_bounds(flat.numel(), codec.block_size, size)
    lo, hi = bounds[rank]
    splits = [b - a for a, b in bounds]
    received = intra.all_to_all(flat.float(), splits, [hi - lo] * size)
    shard = received.view(size, hi - lo).div_(size).sum(0)  # scaled first: cannot overflow
    inner = choose_algorithm(codec, hi - lo, inter.world_size)
    slot = max(splits)  # and a status, as in _reduce_scatter_piece
    padded = torch.zeros(slot + 1, dtype=torch.float32, device=flat.device)
    compressed = None if local is None and residual is None else torch.empty_like(shard)
    try:
        _run(inner, shard, channel._replace(transport=inter), padded[:hi - lo],
             FeedbackBuffers(local=compressed, server=_piece(server_residual, lo, hi)))
        failure = None
    except ValueError as exc:  # still take part in the node's all_gather (see _reduce_scatter)
        padded[:hi - lo], compressed, failure = float("nan"), shard, exc
    if compressed is not None:
        own = flat[lo:hi] - (shard - compressed) * size  # local on this rank's shard
        if local is not None:
            local.copy_(flat)
            local[lo:hi] = own
        if residual is not None:  # flat minus local (its shard first: residual may be flat)
            lost = flat[lo:hi] - own
            torch.sub(flat, flat, out=residual)  # zero, or NaN where flat is not finite
            residual[lo:hi] = lost
    padded[slot] = failure is not None
    gathered = intra.all_gather(padded).view(size, slot + 1)
    _raise_if_failed(failure, gathered[:, slot])
    for r, (a, b) in enumerate(bounds):
        out[a:b] = gathered[r, :b - a]
