"""QSGD's variable-length (Elias) coding: sizes, the bound a payload cannot pass, refused
forgeries, and the collectives moving payloads whose size depends on the data (in-process
ranks; gloo ranks in test_collectives)."""
import math
import struct

import pytest
import torch

import commpress as cp
from commpress.codecs import HEADER_BYTES, kernels, native
from commpress.comm import Channel, FeedbackBuffers, LoopbackGroup, compressed_mean
from commpress.comm.collectives import compressed_reduce_scatter
from commpress.comm.loopback import LoopbackTransport
from commpress.comm.transport import HierarchicalTransport


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_max_norm_coding_decodes_to_the_fixed_width_codes_values(bits):
    """``qsgd{bits}e`` is ``qsgd{bits}``'s quantization (the same draws give the same values)
    in fewer bytes."""
    packed, coded = cp.codec_from_name(f"qsgd{bits}"), cp.codec_from_name(f"qsgd{bits}e")
    x = torch.randn(100_003, generator=torch.Generator().manual_seed(bits)) ** 3  # heavy tails
    kernels.set_enabled(False)  # the eager codes of both: the same random stream
    try:
        a, b = (c.encode(x, torch.Generator().manual_seed(5)) for c in (packed, coded))
    finally:
        kernels.set_enabled(None)
    assert torch.equal(packed.decode(a), coded.decode(b))
    assert b.nbytes < 0.85 * a.nbytes, (b.nbytes, a.nbytes)


@pytest.mark.parametrize("levels,most_bits", [(1, 0.45), (2, 0.72), (4, 1.1), (8, 1.7)])
def test_l2_buckets_take_a_fraction_of_a_bit_on_gaussian_data(levels, most_bits):
    """The paper's variant on Gaussian data, buckets of 512 (the estimates: about 0.42, 0.68,
    1.1 and 1.7 bits per entry), with the error its rounding probabilities give."""
    codec = cp.codec_from_name(f"elias{levels}")
    x = torch.randn(1 << 18, generator=torch.Generator().manual_seed(0))
    payload = codec.encode(x, torch.Generator().manual_seed(1))
    assert 8 * payload.nbytes / x.numel() < most_bits
    error = (codec.decode(payload) - x).square().sum() / x.square().sum()
    expected = codec.expected_sq_error(x) / x.square().sum()
    assert error.item() == pytest.approx(expected.item(), rel=0.05)
    assert expected.item() <= min(512 / levels ** 2, math.sqrt(512) / levels)


def adversarial_inputs(n):
    """Inputs whose codes are as long as they get: every value non-zero at the top level
    (gaps of 1), every other one, one value at the very end (one gap of n), and random
    sparsity at several densities."""
    g = torch.Generator().manual_seed(0)
    yield torch.ones(n)
    yield torch.arange(n).remainder(2).float()
    last = torch.zeros(n)
    last[-1] = 1.0
    yield last
    for density in (0.5, 0.1, 0.01, 0.001):
        yield (torch.rand(n, generator=g) < density).float() * torch.randn(n, generator=g)


@pytest.mark.parametrize("codec", [cp.EliasQSGD(levels=1), cp.EliasQSGD(levels=3, norm="max"),
                                   cp.EliasQSGD(levels=127, bucket_size=64, norm="max"),
                                   cp.EliasQSGD(levels=16, bucket_size=4096)], ids=repr)
def test_no_input_passes_the_bound(codec):
    for n in (1, 2, 513, 70_001):
        for x in adversarial_inputs(n):
            payload = codec.encode(x, torch.Generator().manual_seed(2))
            assert payload.nbytes <= codec.wire_bytes(n)
            y = codec.decode(payload)
            assert ((y != 0) <= (x != 0)).all(), "a zero decoded as non-zero"


def body_prefix(data):
    return struct.unpack("<qqq", bytes(data[HEADER_BYTES:HEADER_BYTES + 24].numpy()))


def with_prefix(data, nnz, length_bits, rest_bits):
    forged = data.clone()
    forged[HEADER_BYTES:HEADER_BYTES + 24] = torch.frombuffer(
        bytearray(struct.pack("<qqq", nnz, length_bits, rest_bits)), dtype=torch.uint8)
    return forged


@pytest.mark.parametrize("density", [0.0, 0.002, 0.05, 0.2, 0.7, 1.0])
def test_set_bits_torch_and_numpy_paths_agree(density):
    """The CPU scans bits with numpy, other devices with torch operations (a sparse and a
    dense path): the same positions, most significant bit first."""
    from commpress.codecs.elias import _set_bits, _set_bits_torch
    bits = (torch.rand(8 * 4099, generator=torch.Generator().manual_seed(3)) < density)
    section = (bits.view(-1, 8).to(torch.uint8) << torch.arange(7, -1, -1, dtype=torch.uint8)
               ).sum(1, dtype=torch.uint8)
    expected = bits.nonzero().view(-1)
    assert torch.equal(_set_bits(section, expected.numel()), expected)
    assert torch.equal(_set_bits_torch(section, expected.numel()), expected)


def test_scattered_decode_is_the_dense_one_and_a_non_finite_bucket_stays_whole():
    """The non-zeros are scattered into the output (no full-size temporary); a bucket whose
    scale is not finite decodes as a whole non-finite bucket, zeros included (0 * inf), as
    the fixed-width codecs' do."""
    codec = cp.EliasQSGD(levels=4, bucket_size=64)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    data = codec.encode(x, torch.Generator().manual_seed(0)).data
    scales, position, signed, finite = codec._sparse_levels(data[HEADER_BYTES:], 1000)
    dense = torch.zeros(16 * 64)
    dense[position] = signed.float() / 4
    dense = (dense.view(-1, 64) * scales.unsqueeze(1)).view(-1)[:1000]
    assert finite and torch.equal(codec.decode(cp.Payload(data)), dense)
    start = torch.randn(1000, generator=torch.Generator().manual_seed(6))
    assert torch.equal(codec.decode_into(cp.Payload(data), start.clone(), alpha=0.5),
                       start + dense * 0.5)
    half = codec.decode(cp.Payload(data), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, dense.to(torch.bfloat16))
    x[200] = float("inf")  # in bucket 3 (values 192-255)
    decoded = codec.decode(codec.encode(x, torch.Generator().manual_seed(0)))
    assert not torch.isfinite(decoded[192:256]).any()
    assert torch.isfinite(torch.cat([decoded[:192], decoded[256:]])).all()


def test_forged_sizes_are_refused_before_anything_is_allocated():
    codec = cp.EliasQSGD(levels=4)
    data = codec.encode(torch.randn(2000), torch.Generator().manual_seed(0)).data
    nnz, length_bits, rest_bits = body_prefix(data)
    for forged in [(2001, length_bits, rest_bits), (-1, length_bits, rest_bits),
                   (nnz, 1 << 60, rest_bits), (nnz, length_bits, 1 << 62),
                   (nnz, nnz - 1, rest_bits), (0, 5, 0)]:
        with pytest.raises(ValueError, match="impossible sizes"):
            codec.decode(cp.Payload(with_prefix(data, *forged)))
    # sizes the bound allows but the bytes do not back: refused by length
    with pytest.raises(ValueError, match="truncated"):
        codec.decode(cp.Payload(with_prefix(data, nnz, length_bits + 64, rest_bits)))


def test_on_an_accelerator_the_decoder_checks_the_stated_length_reading_it_once(monkeypatch):
    """Given the element count, an accelerator's decode reads no header (the host read would
    stall the stream): a variable-length payload is held to its bound without looking at it,
    and the decoder checks the length its body states as it reads the statement, once."""
    from commpress.codecs import elias, wire
    codec = cp.EliasQSGD(levels=4)
    data = codec.encode(torch.randn(2000), torch.Generator().manual_seed(0)).data
    reads = []
    stated_sizes = elias._stated_sizes
    monkeypatch.setattr(elias, "_stated_sizes", lambda body: reads.append(1) or stated_sizes(body))
    out = torch.empty(2000)
    wire._check_layout(codec, data, 2000)
    codec._decode_body(data[HEADER_BYTES:], out)
    assert len(reads) == 1 and torch.equal(out, codec.decode(cp.Payload(data)))
    for wrong in (torch.cat([data, data[:1]]), data[:-1]):  # a byte too many, one too few
        wire._check_layout(codec, wrong, 2000)  # within the bound
        with pytest.raises(ValueError, match="its prefix states"):
            codec._decode_body(wrong[HEADER_BYTES:], out)
    over = torch.zeros(codec.wire_bytes(2000) + 1, dtype=torch.uint8)
    for outside in (over, data[:HEADER_BYTES]):
        with pytest.raises(ValueError, match="lies outside"):
            wire._check_layout(codec, outside, 2000)


def test_every_single_byte_change_decodes_or_raises_value_error(monkeypatch):
    """Each byte of a payload (header, sizes, scales, both streams) set to 4 other values:
    decoding gives the right length or raises ValueError, nothing else; the vectorised torch
    decoder and the native one (where it builds) refuse the same changes and decode the others
    to the same values (a changed scale may be NaN: its whole bucket is NaN on both)."""
    coder = native.library()
    decoders = [lambda: None] + ([lambda: coder] if coder is not None else [])
    for codec in (cp.EliasQSGD(levels=1, bucket_size=64), cp.EliasQSGD(levels=5, bucket_size=64)):
        x = torch.randn(300, generator=torch.Generator().manual_seed(1))
        data = codec.encode(x, torch.Generator().manual_seed(0)).data
        decoded = 0
        for index in range(data.numel()):
            for value in (0, 1, 0x80, 0xFF):
                changed = data.clone()
                changed[index] = value
                outcomes = []
                for decoder in decoders:
                    monkeypatch.setattr(native, "library", decoder)
                    try:
                        outcomes.append(codec.decode(cp.Payload(changed)))
                        assert outcomes[-1].numel() == 300
                    except ValueError:
                        outcomes.append(None)
                if any(outcome is None for outcome in outcomes):
                    assert all(outcome is None for outcome in outcomes), (index, value)
                    continue
                decoded += 1
                assert all(torch.allclose(outcome, outcomes[0], rtol=0, atol=0, equal_nan=True)
                           for outcome in outcomes), (index, value)
        assert decoded > 0  # some changes (in scales, in mantissas) still decode


def test_decode_mean_spans_are_checked():
    codec = cp.EliasQSGD(levels=2)
    payloads = [codec.encode(torch.randn(100) * r, torch.Generator().manual_seed(r)).data
                for r in range(2)]
    gathered = torch.cat(payloads)
    spans = [(0, payloads[0].numel()), (payloads[0].numel(), payloads[1].numel())]
    out = torch.empty(100)
    codec.decode_mean(gathered, 2, out, spans=spans)
    expected = torch.zeros(100)
    for p in payloads:
        expected.add_(codec.decode(cp.Payload(p)) * 0.5)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="do not place 2 payloads"):
        codec.decode_mean(gathered, 2, out, spans=[(0, 5), (5, gathered.numel())])
    with pytest.raises(ValueError, match="payload 1"):  # a span cutting a payload short
        codec.decode_mean(gathered, 2, out, spans=[spans[0], (spans[1][0], spans[1][1] - 1)])
    streams = spans[1][0] + HEADER_BYTES + 24 + 4  # payload 1's streams (one bucket's scale)
    emptied = gathered.clone()
    emptied[streams:] = 0  # the right length, but no codes where the prefix states some
    with pytest.raises(cp.codecs.PayloadError, match="payload 1: payload's length stream") as error:
        codec.decode_mean(emptied, 2, out, spans=spans)
    assert error.value.index == 1


def unequal_inputs(rank, n):
    """Rank 0 sends almost nothing (zeros), rank 1 a dense vector, the others sparse ones:
    their payloads differ in size by orders of magnitude."""
    g = torch.Generator().manual_seed(rank)
    if rank == 0:
        return torch.zeros(n)
    x = torch.randn(n, generator=g)
    return x if rank == 1 else x * (torch.rand(n, generator=g) < 0.05)


@pytest.mark.parametrize("algorithm", ["allgather", "reduce_scatter", "hierarchical"])
@pytest.mark.parametrize("codec", [cp.EliasQSGD(levels=8), cp.Rotated(cp.EliasQSGD(levels=16))],
                         ids=repr)
def test_collectives_move_payloads_of_data_dependent_sizes(monkeypatch, algorithm, codec):
    """Four ranks with payloads of very different sizes: every rank gets the same mean, with
    the codec's error; what an all-gather puts on the wire is the payloads' own sizes (padded
    to the largest), not the bound."""
    from commpress.comm import collectives
    monkeypatch.setattr(collectives, "PIPELINE_ELEMENTS", 4000)  # several pieces in flight
    n, w = 10_007, 4
    intra, inter = [LoopbackGroup(2), LoopbackGroup(2)], [LoopbackGroup(2), LoopbackGroup(2)]

    def rank_fn(flat):
        transport = flat
        if algorithm == "hierarchical":
            node, local = divmod(flat.rank, 2)
            transport = HierarchicalTransport(flat, LoopbackTransport(intra[node], local),
                                              LoopbackTransport(inter[local], node))
        x = unequal_inputs(flat.rank, n)
        server = torch.zeros(n) if algorithm == "reduce_scatter" else None
        mean, local = compressed_mean(x,
                                      Channel(codec, transport,
                                              torch.Generator().manual_seed(10 + flat.rank)),
                                      algorithm, keep_local=True,
                                      feedback=FeedbackBuffers(server=server))
        return mean, local, flat.sent_bytes + getattr(transport, "intra_node_bytes", 0)

    results = LoopbackGroup(w).run(rank_fn)
    exact = torch.stack([unequal_inputs(r, n) for r in range(w)]).mean(0)
    for mean, _, _ in results:
        assert torch.equal(mean, results[0][0]), "ranks disagree"
    error = (results[0][0] - exact).square().sum() / exact.square().sum()
    assert 0 < error < 2.0
    if algorithm != "hierarchical":  # there local carries the node's loss on rank 0's shard
        assert torch.equal(results[0][1], torch.zeros(n))  # rank 0's zeros stay zeros
    if algorithm == "allgather":
        from commpress.comm.collectives import pipeline_pieces
        bound = (w - 1) * sum(codec.wire_bytes(hi - lo) for lo, hi in pipeline_pieces(n, codec.block_size))
        assert max(sent for _, _, sent in results) < bound / 3


def test_allgather_mean_is_the_mean_of_the_decoded_payloads():
    """One piece: the all-gathered mean is, bit for bit, the payloads decoded in rank order
    and added times 1/W, whatever their sizes."""
    codec, n, w = cp.EliasQSGD(levels=4), 3001, 3

    def rank_fn(transport):
        return compressed_mean(unequal_inputs(transport.rank, n),
                               Channel(codec, transport,
                                       torch.Generator().manual_seed(transport.rank)),
                               "allgather")[0]

    results = LoopbackGroup(w).run(rank_fn)
    expected = torch.zeros(n)
    for r in range(w):
        payload = codec.encode(unequal_inputs(r, n), torch.Generator().manual_seed(r))
        expected.add_(codec.decode(payload) * (1 / w))
    for mean in results:
        assert torch.equal(mean, expected)


def test_reduce_scatter_of_fsdp_chunks_with_unequal_payloads():
    """FSDP's reduce-scatter (W chunks in, this rank's chunk of the mean out) with payloads
    whose sizes differ by rank and chunk; with error feedback's residual."""
    codec, n, w = cp.EliasQSGD(levels=16), 2000, 3
    inputs = [unequal_inputs(r, w * n) for r in range(w)]
    exact = torch.stack(inputs).mean(0).view(w, n)

    def rank_fn(transport):
        residual = torch.empty(w * n)
        out = compressed_reduce_scatter(inputs[transport.rank],
                                        Channel(codec, transport,
                                                torch.Generator().manual_seed(transport.rank)),
                                        residual_out=residual)
        return out, residual

    for rank, (out, residual) in enumerate(LoopbackGroup(w).run(rank_fn)):
        assert ((out - exact[rank]).norm() / exact[rank].norm()) < 0.6
        if rank == 0:
            assert torch.equal(residual, torch.zeros(w * n))


def test_hook_names_and_error_feedback():
    assert cp.codec_from_name("qsgd2e") == cp.EliasQSGD(levels=1, bucket_size=128, norm="max")
    assert cp.codec_from_name("elias8") == cp.EliasQSGD(levels=8)
    with pytest.raises(ValueError, match="diverges"):
        cp.CompressionConfig(codec=cp.codec_from_name("elias1"), error_feedback="ef")
    cp.CompressionConfig(codec=cp.codec_from_name("elias8"), error_feedback="ef")
    with pytest.raises(ValueError, match="levels must be an integer in 1..127"):
        cp.EliasQSGD(levels=128)


def test_compiled_and_eager_paths_write_and_read_the_same_bytes():
    """Above the kernels' threshold the records are built, written and read by compiled
    kernels: the same bytes as the eager reference from the same codes (an odd bucket keeps
    the codes themselves eager, drawn from the generator), and the same values decoded."""
    codec = cp.EliasQSGD(levels=5, bucket_size=511)
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3)) ** 3
    payloads, values = [], []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        try:
            payloads.append(codec.encode(x, torch.Generator().manual_seed(0)).data)
            values.append(codec.decode(cp.Payload(payloads[0])))
        finally:
            kernels.set_enabled(None)
    assert torch.equal(payloads[0], payloads[1])
    assert torch.equal(values[0], values[1])
