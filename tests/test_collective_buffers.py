"""Where the reduction writes. A mean written into the input vector (the DDP hook averages
its bucket in place) is bit-identical to one written into a fresh buffer, for every
algorithm and across pipeline pieces; error-feedback memories are updated in place and never
alias the caller's buffers. In-process ranks (loopback transport)."""
import math

import pytest
import torch

import commpress as cp
from commpress.comm import (Channel, FeedbackBuffers, Layout, LoopbackGroup, collectives,
                           compressed_mean)
from commpress.comm.collectives import pipeline_pieces
from commpress.comm.loopback import LoopbackTransport
from commpress.comm.pipeline import reduce_gradient
from commpress.comm.segments import Segments
from commpress.comm.transport import HierarchicalTransport
from commpress.feedback import ErrorFeedback

NUMEL = 5003  # not a multiple of any block: a tail in the last piece


def hierarchical(flat, intra_groups, inter_groups, local_size=2):
    node, local = divmod(flat.rank, local_size)
    return HierarchicalTransport(flat, LoopbackTransport(intra_groups[node], local),
                                 LoopbackTransport(inter_groups[local], node))


@pytest.mark.parametrize("algorithm,codec,keep_local,server", [
    ("allgather", cp.QSGD(bits=4), True, False),
    ("allgather", cp.NaturalCompression(), False, False),
    ("reduce_scatter", cp.QSGD(bits=4), True, True),
    ("reduce_scatter", cp.NaturalDithering(), False, False),
    ("hierarchical", cp.QSGD(bits=4), True, True),
    ("allreduce", cp.FP16(), True, False),
], ids=lambda v: repr(v) if isinstance(v, cp.Codec) else str(v))
def test_mean_written_in_place_matches_a_fresh_buffer(monkeypatch, algorithm, codec, keep_local,
                                                      server):
    monkeypatch.setattr(collectives, "PIPELINE_ELEMENTS", 1000)  # several pieces in flight
    intra = [LoopbackGroup(2), LoopbackGroup(2)]
    inter = [LoopbackGroup(2), LoopbackGroup(2)]

    def rank_fn(flat):
        transport = hierarchical(flat, intra, inter) if algorithm == "hierarchical" else flat
        x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(flat.rank))
        runs = []
        for in_place in (False, True):
            y = x.clone()
            residual = 0.01 * torch.randn(NUMEL, generator=torch.Generator().manual_seed(9)) if server else None
            mean, local = compressed_mean(y,
                                          Channel(codec, transport,
                                                  torch.Generator().manual_seed(10 + flat.rank)),
                                          algorithm, out=y if in_place else None,
                                          keep_local=keep_local,
                                          feedback=FeedbackBuffers(server=residual))
            assert (mean.data_ptr() == y.data_ptr()) == in_place
            if not in_place:
                assert torch.equal(y, x), "the input was overwritten"
            runs.append((mean.clone(), local, residual))
        return runs

    results = LoopbackGroup(4).run(rank_fn)
    for fresh, in_place in results:
        assert torch.equal(fresh[0], results[0][0][0]), "ranks disagree"
        for a, b in zip(fresh, in_place):
            assert (a is None and b is None) or torch.equal(a, b)
    exact = torch.stack([torch.randn(NUMEL, generator=torch.Generator().manual_seed(r))
                         for r in range(4)]).mean(0)
    assert (results[0][0][0] - exact).norm() < 0.5 * exact.norm()  # a mean, not garbage


def test_out_must_fit():
    transport = LoopbackGroup(1)
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        transport.run(lambda t: compressed_mean(torch.zeros(8), Channel(cp.QSGD(bits=4), t),
                                                "allgather",
                                                out=torch.zeros(8, dtype=torch.float16)))


@pytest.mark.parametrize("kind", ["ef", "ef21"])
def test_feedback_memories_are_updated_in_place(kind):
    params = [torch.zeros(3), torch.zeros(4)]
    feedback = ErrorFeedback(kind)
    gen = torch.Generator().manual_seed(0)
    memories = None
    names = ("residual",) if kind == "ef" else ("worker", "shared")
    expected = {name: [torch.zeros(p.numel()) for p in params] for name in names}
    for step in range(3):
        grad, local, mean = (torch.randn(7, generator=gen) for _ in range(3))
        if step == 2:
            local[1] = math.inf  # an overflowing step keeps the old memory entry
        sent = feedback.compensate(params, grad)
        sent_value = sent.clone()
        if kind == "ef":  # the collective writes p - C(p) over what was sent
            sent.sub_(local)
        result = feedback.update(params, sent, None if kind == "ef" else local.clone(), mean.clone())
        if kind == "ef":
            new = {"residual": sent_value - local}
            assert torch.equal(result, mean)
        else:
            new = {"worker": torch.cat(expected["worker"]) + local,
                   "shared": torch.cat(expected["shared"]) + mean}
            assert torch.equal(result, new["shared"])
        for name, value in new.items():
            for i, part in enumerate(value.split([3, 4])):
                expected[name][i] = torch.where(torch.isfinite(part), part, expected[name][i])
        result.fill_(7.0)  # the caller reuses its buffer: the memories must not see it
        for name in names:
            for i, p in enumerate(params):
                assert torch.equal(feedback.memories[name][p], expected[name][i]), (step, name, i)
        pointers = {(n, i): feedback.memories[n][p].data_ptr() for n in names
                    for i, p in enumerate(params)}
        if memories is not None:
            assert pointers == memories, "a memory was reallocated"
        memories = pointers


def test_loaded_memories_are_copies():
    """Memories are updated in place: ones loaded from a checkpoint must not write into it."""
    weight = torch.zeros(4)
    feedback = ErrorFeedback("ef")
    feedback.bind([("w", weight)])
    saved = {"kind": "ef", "residual": {"w": torch.ones(4)}}
    feedback.load_state_dict(saved)
    sent = feedback.compensate([weight], torch.ones(4))
    feedback.update([weight], sent, torch.zeros(4), torch.zeros(4))
    assert torch.equal(feedback.memories["residual"][weight], torch.full((4,), 2.0))
    assert torch.equal(saved["residual"]["w"], torch.ones(4))


@pytest.mark.parametrize("algorithm, codec", [
    ("allgather", cp.QSGD(bits=4, bucket_size=128)), ("reduce_scatter", cp.QSGD(bits=4, bucket_size=128)),
    ("allreduce", cp.FP16()), ("allreduce", cp.BF16()), ("allreduce", cp.Identity())])
def test_segments_reduce_where_they_lie_bit_identical_to_a_concatenation(monkeypatch, algorithm, codec):
    """A bucket's large gradients, interleaved with small ones, reduced through Segments:
    the same bytes and mean as their concatenation, pieces (and allreduce's cast slices)
    across parts included, and the small ones between them untouched."""
    monkeypatch.setattr(collectives, "PIPELINE_ELEMENTS", 1024)  # many pieces, some across parts
    monkeypatch.setattr(collectives, "CAST_SLICE", 1000)
    cuts = [(0, 1500), (1510, 3000), (3003, 3003), (3003, NUMEL)]  # gaps hold "biases"

    def rank_fn(transport):
        bucket = torch.randn(NUMEL, generator=torch.Generator().manual_seed(transport.rank))
        joined = torch.cat([bucket[a:b] for a, b in cuts])
        sent = transport.sent_bytes
        expected, _ = compressed_mean(joined,
                                      Channel(codec, transport,
                                              torch.Generator().manual_seed(3 + transport.rank)),
                                      algorithm)
        sent_joined, sent = transport.sent_bytes - sent, transport.sent_bytes
        before = bucket.clone()
        parts = Segments([bucket[a:b] for a, b in cuts])
        compressed_mean(parts,
                        Channel(codec, transport, torch.Generator().manual_seed(3 + transport.rank)),
                        algorithm, out=parts)
        return expected, parts.concatenated(), bucket, before, (sent_joined, transport.sent_bytes - sent)

    for expected, got, bucket, before, (sent_joined, sent) in LoopbackGroup(3).run(rank_fn):
        assert torch.equal(got, expected) and sent == sent_joined
        assert torch.equal(bucket[1500:1510], before[1500:1510])
        assert torch.equal(bucket[3000:3003], before[3000:3003])


def test_segments_outside_the_piecewise_algorithms_go_through_one_copy():
    codec = cp.FP16()

    def rank_fn(transport):
        parts = Segments([torch.zeros(4), torch.zeros(4)])
        with pytest.raises(ValueError, match="reduced in place"):
            compressed_mean(parts, Channel(codec, transport), "hierarchical", out=parts)
        bucket = torch.full((10,), float(transport.rank + 1), dtype=torch.float16)  # fp16 grads
        parts = Segments([bucket[0:4], bucket[6:10]])
        assert reduce_gradient(parts, Layout([]), Channel(codec, transport),
                               collective="allreduce") is parts
        return bucket

    for bucket in LoopbackGroup(2).run(rank_fn):
        assert bucket[[0, 3, 6, 9]].eq(1.5).all() and bucket[4:6].eq(bucket[4]).all()


@pytest.mark.parametrize("kind, server, algorithm", [
    ("ef", False, "allgather"), ("ef21", False, "allgather"), ("ef", True, "reduce_scatter"),
    ("ef21", False, "reduce_scatter")])  # EF21 always keeps the server residual
def test_segments_with_error_feedback_match_the_concatenated_reduction(monkeypatch, kind, server,
                                                                      algorithm):
    """Error feedback reads and writes a bucket's gradients where they lie, and
    reduce_scatter's server residuals where they lie in each parameter's memory: the same
    means and the same memories, step after step, as through concatenated copies."""
    monkeypatch.setattr(collectives, "PIPELINE_ELEMENTS", 256)  # pieces across parameters
    codec = cp.QSGD(bits=2, bucket_size=64)
    cuts = [(0, 700), (710, 1500)]

    def rank_fn(transport):
        keys = [torch.zeros(700), torch.zeros(790)]
        joined_fb, parts_fb = ErrorFeedback(kind, server), ErrorFeedback(kind, server)
        joined_gen, parts_gen = (torch.Generator().manual_seed(transport.rank) for _ in range(2))
        for step in range(3):
            bucket = torch.randn(1500, generator=torch.Generator().manual_seed(10 * step + transport.rank))
            joined = torch.cat([bucket[a:b] for a, b in cuts])
            expected = reduce_gradient(joined, Layout(keys), Channel(codec, transport, joined_gen),
                                       collective=algorithm, feedback=joined_fb, in_place=True)
            parts = Segments([bucket[a:b] for a, b in cuts])
            assert reduce_gradient(parts, Layout(keys), Channel(codec, transport, parts_gen),
                                   collective=algorithm, feedback=parts_fb) is parts
            assert torch.equal(parts.concatenated(), expected)
        for memory, joined_store in joined_fb.memories.items():
            parts_store = parts_fb.memories[memory]
            assert set(map(id, joined_store)) == set(map(id, parts_store))
            assert all(torch.equal(joined_store[key], parts_store[key]) for key in joined_store)
        assert joined_fb.memories[("residual" if kind == "ef" else "worker")]  # not vacuous
        if algorithm == "reduce_scatter":  # the server residuals: each parameter's own tensor
            assert joined_fb.memories["server"][keys[0]].abs().sum() > 0
            assert all(m._base is None for m in parts_fb.memories["server"].values())
        return True

    assert all(LoopbackGroup(2).run(rank_fn))


@pytest.mark.parametrize("codec, algorithm", [
    (cp.QSGD(bits=2, bucket_size=64), "allgather"), (cp.QSGD(bits=2, bucket_size=64), "reduce_scatter"),
    (cp.NaturalCompression(), "reduce_scatter"), (cp.FP16(), "allreduce")])
def test_ef21_keeps_its_own_contribution_where_it_sent_from(monkeypatch, codec, algorithm):
    """EF21 no longer needs what it sent once that is encoded, so its own compressed
    contribution is decoded into that vector (no second full-size buffer: 2.0x -> 1.0x the
    bucket of transient memory). Means and memories are bit-identical, step after step, to
    the same reduction with that contribution in a buffer of its own."""
    from commpress.comm import pipeline
    monkeypatch.setattr(collectives, "PIPELINE_ELEMENTS", 256)  # several pieces in flight
    aliased = []

    def spy(*args, feedback=None, **kwargs):
        aliased.append(feedback.local is not None and feedback.local is args[0])
        return compressed_mean(*args, feedback=feedback, **kwargs)

    def separate(*args, feedback=None, **kwargs):
        return compressed_mean(*args, feedback=feedback._replace(local=None), **kwargs)

    def rank_fn(transport):
        keys = [torch.zeros(700), torch.zeros(790)]
        feedback, gen = ErrorFeedback("ef21"), torch.Generator().manual_seed(transport.rank)
        means = [reduce_gradient(torch.randn(1490, generator=torch.Generator().manual_seed(
            10 * step + transport.rank)),
                                 Layout(keys), Channel(codec, transport, gen),
                                 collective=algorithm, feedback=feedback)
            for step in range(3)]
        return means, [[store.get(k) for k in keys] for store in feedback.memories.values()]

    runs = {}
    for name, reduction in (("in place", spy), ("separate", separate)):
        monkeypatch.setattr(pipeline, "compressed_mean", reduction)
        runs[name] = LoopbackGroup(2).run(rank_fn)
    for (means, memories), (means_ref, memories_ref) in zip(runs["in place"], runs["separate"]):
        assert all(torch.equal(a, b) for a, b in zip(means, means_ref))
        assert all(a is b is None or torch.equal(a, b) for store, ref in zip(memories, memories_ref)
                   for a, b in zip(store, ref))  # the server residual only where requantized
        assert memories[0][0].abs().sum() > 0  # the worker estimate: not vacuous
    assert len(aliased) == 6 and all(aliased)  # 2 ranks x 3 steps, each in place


@pytest.mark.parametrize("codec, algorithm, server, masked", [
    (cp.QSGD(bits=2, bucket_size=64), "allgather", False, False),
    (cp.QSGD(bits=2, bucket_size=64), "reduce_scatter", True, False),
    (cp.NaturalCompression(), "reduce_scatter", False, False),
    (cp.FP16(), "allreduce", False, False),
    (cp.QSGD(bits=4), "hierarchical", True, False),
    (cp.QSGD(bits=4), "allgather", False, True)], ids=str)
def test_ef_writes_its_next_memory_over_what_it_sent(monkeypatch, codec, algorithm, server, masked):
    """Plain EF keeps ``p - C(p)``: the collective decodes each piece's own payload with weight
    -1 into ``p`` once the piece is encoded (no buffer for ``C(p)``: 2x -> 1x the bucket of
    transient memory). Means and memories are bit-identical, step after step, to ``p`` minus
    the rank's compressed contribution decoded into a buffer of its own; masked (AC/DC),
    entries outside the mask keep their memory."""
    from commpress.comm import pipeline
    monkeypatch.setattr(collectives, "PIPELINE_ELEMENTS", 256)  # several pieces in flight
    aliased = []

    def spy(flat, *args, feedback=None, **kwargs):
        aliased.append(feedback.residual is flat)
        return compressed_mean(flat, *args, feedback=feedback, **kwargs)

    def separate(flat, *args, feedback=None, keep_local=False, **kwargs):
        sent = flat.clone()
        mean, local = compressed_mean(flat, *args, keep_local=True,
                                      feedback=feedback._replace(residual=None), **kwargs)
        torch.sub(sent, local, out=feedback.residual)
        return mean, None

    def rank_fn(transport):
        if algorithm == "hierarchical":
            transport = hierarchical(transport, *groups)
        keys = [torch.zeros(700), torch.zeros(790)]
        feedback, gen = ErrorFeedback("ef", server), torch.Generator().manual_seed(transport.rank)
        keep = torch.arange(0, 1490, 3) if masked else None
        means = [reduce_gradient(torch.randn(1490, generator=torch.Generator().manual_seed(
            10 * step + transport.rank)),
                                 Layout(keys, keep=keep), Channel(codec, transport, gen),
                                 collective=algorithm, feedback=feedback) for step in range(3)]
        if masked:  # entries outside the mask: memory g + e summed, nothing sent
            assert all(float(m[1]) == 0 for m in means)
        return means, [[store.get(k) for k in keys] for store in feedback.memories.values()]

    runs = {}
    for name, reduction in (("in place", spy), ("separate", separate)):
        monkeypatch.setattr(pipeline, "compressed_mean", reduction)
        if algorithm == "hierarchical":
            groups = [LoopbackGroup(2), LoopbackGroup(2)], [LoopbackGroup(2), LoopbackGroup(2)]
        runs[name] = LoopbackGroup(4 if algorithm == "hierarchical" else 2).run(rank_fn)
    for (means, memories), (means_ref, memories_ref) in zip(runs["in place"], runs["separate"]):
        assert all(torch.equal(a, b) for a, b in zip(means, means_ref))
        assert all(a is b is None or torch.equal(a, b) for store, ref in zip(memories, memories_ref)
                   for a, b in zip(store, ref))
        assert sum(m.abs().sum() for m in memories[0]) > 0  # the residuals: not vacuous
    assert aliased and all(aliased)


def test_residual_out_replaces_the_local_contribution():
    transport = LoopbackGroup(1)
    with pytest.raises(ValueError, match="feedback.residual must be a tensor, and replaces"):
        transport.run(lambda t: compressed_mean(torch.zeros(8), Channel(cp.QSGD(bits=4), t),
                                                "allgather", keep_local=True,
                                                feedback=FeedbackBuffers(residual=torch.zeros(8))))
    wrong = FeedbackBuffers(residual=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="feedback.residual must be float32 of shape"):
        transport.run(lambda t: compressed_mean(torch.zeros(8), Channel(cp.QSGD(bits=4), t),
                                                "allgather", feedback=wrong))


def test_local_out_only_where_pieces_are_encoded_before_it_is_written():
    transport = LoopbackGroup(1)
    with pytest.raises(ValueError, match="feedback.local must be float32 of shape"):
        transport.run(lambda t: compressed_mean(torch.zeros(8), Channel(cp.QSGD(bits=4), t),
                                                "allgather",
                                                feedback=FeedbackBuffers(local=torch.zeros(4))))
    with pytest.raises(ValueError, match="feedback.local must be a tensor and the algorithm one of"):
        transport.run(lambda t: compressed_mean(torch.zeros(8), Channel(cp.QSGD(bits=4), t),
                                                "hierarchical",
                                                feedback=FeedbackBuffers(local=torch.zeros(8))))


@pytest.mark.parametrize("block", [1, 64, 512])
def test_pipeline_pieces_cover_the_vector_at_the_set_size(monkeypatch, block):
    """Pieces are aligned to the codec's block, cover the vector end to end, are as many as
    pieces of the module's PIPELINE_ELEMENTS as it is at the call need (the tests above
    shrink it to put several pieces in flight: a default bound at import left allgather with
    one piece), and of equal sizes to a block: no short last piece, which would fall under
    the fused kernels' threshold."""
    monkeypatch.setattr(collectives, "PIPELINE_ELEMENTS", 4096)
    size = max(4096 // block, 1) * block
    for numel in (0, 1, 4096, 4097, 5003, 3 * 4096 + 17, 100_000):
        pieces = pipeline_pieces(numel, block)
        assert pieces[0][0] == 0 and pieces[-1][1] == numel, (numel, pieces)
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])), (numel, pieces)
        assert all(lo % block == 0 for lo, _ in pieces)
        assert len(pieces) == max(math.ceil(numel / size), 1)
        sizes = [hi - lo for lo, hi in pieces]
        assert max(sizes) <= size and max(sizes) - min(sizes) <= block, (numel, sizes)


@pytest.mark.parametrize("layout", [[[0, 1], [2, 3]], [[0, 2], [1, 3]]], ids=["blocked", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_hop_reduce_scatter_gives_each_rank_its_chunk_of_the_mean(layout, dtype):
    """Inside the node uncompressed, across nodes compressed: with Identity every rank's chunk
    is the mean over all four ranks (to rounding), whichever way ranks lie on the nodes; with
    QSGD-8 within its noise; and a rank sends N - 1 = 1 compressed chunk across nodes, not 3."""
    from commpress.comm.collectives import compressed_reduce_scatter, node_mean_of_chunks
    n = 1000  # values per chunk
    inputs = [torch.randn(4 * n, generator=torch.Generator().manual_seed(r)).to(dtype) for r in range(4)]
    exact = torch.stack([x.float() for x in inputs]).mean(0).view(4, n)
    intra = [LoopbackGroup(2), LoopbackGroup(2)]
    inter = [LoopbackGroup(2), LoopbackGroup(2)]

    def rank_fn(flat):
        node = next(i for i, ranks in enumerate(layout) if flat.rank in ranks)
        local = layout[node].index(flat.rank)
        transport = HierarchicalTransport(flat, LoopbackTransport(intra[node], local),
                                          LoopbackTransport(inter[local], node), layout)
        node_mean = node_mean_of_chunks(inputs[flat.rank], transport)
        assert node_mean.dtype == torch.float32 and node_mean.numel() == 2 * n
        out = {}
        for codec in (cp.Identity(), cp.QSGD(bits=8)):
            before = transport.inter.sent_bytes
            channel = Channel(codec, transport.inter, torch.Generator().manual_seed(flat.rank))
            out[repr(codec)] = (compressed_reduce_scatter(node_mean, channel),
                                transport.inter.sent_bytes - before)
        return out

    for rank, out in enumerate(LoopbackGroup(4).run(rank_fn)):
        identity, sent = out[repr(cp.Identity())]
        assert torch.allclose(identity, exact[rank], atol=1e-6), rank
        qsgd8, sent8 = out[repr(cp.QSGD(bits=8))]
        assert ((qsgd8 - exact[rank]).norm() / exact[rank].norm()) < 0.05
        assert 4 * n <= sent < 4 * n + 200 and n <= sent8 < 1.2 * n  # one chunk crosses
