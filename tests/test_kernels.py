"""The fused (compiled) codec kernels against the eager reference: same bytes from the same
randomness, one wire format both ways, unbiased, within the variance bounds, and a clean
fall back to eager when compiling is off or fails."""
import logging
import math

import pytest
import torch

import commpress as cp
from commpress.codecs import HEADER_BYTES, bitpack, kernels
from commpress.codecs.bucketed import random_bits
from commpress.comm import Channel

N = kernels.MIN_NUMEL * 2 + 37  # whole buckets through the kernel, a ragged tail eagerly
CODECS = {"qsgd4": cp.QSGD(bits=4), "qsgd3": cp.QSGD(bits=3), "qsgd8": cp.QSGD(bits=8),
          "qsgd2-128": cp.QSGD(bits=2, bucket_size=128), "qsgd1-128": cp.QSGD(bits=1, bucket_size=128),
          "dithering": cp.NaturalDithering()}


@pytest.fixture
def compiled():
    """The fused kernels on; afterwards none may have fallen back to eager, which only a look
    at the failures shows (the eager code gives the same results)."""
    kernels.set_enabled(True)
    broken = kernels._broken
    yield
    kernels.set_enabled(None)
    if kernels._broken is broken:  # unless the test swapped in a registry of its own
        assert not broken, broken


@pytest.mark.parametrize("name", sorted(CODECS))
def test_fused_encode_is_the_eager_code_with_hashed_randomness(compiled, name):
    codec = CODECS[name]
    x = torch.randn(N, generator=torch.Generator().manual_seed(1))
    x[5] = 0.0
    x[1000:1100] *= 1e-30  # tiny values in one bucket
    payload = codec.encode(x, torch.Generator().manual_seed(7))
    assert payload.nbytes == codec.wire_bytes(N)
    # the eager code given the same key words reproduces the kernel's bytes
    key = kernels.draw_key(torch.Generator().manual_seed(7), x.device)
    done = N // codec.bucket_size * codec.bucket_size
    # tiles of rows of LANES values; lane j's hash gives the uniforms of its column
    rows = codec._kernel_rows()
    columns = kernels.hashed_uniforms(key, done // rows, rows, x.device)
    uniforms = torch.stack([c.view(-1, bitpack.LANES) for c in columns], 1).view(-1)
    scales, codes = codec._quantize(x[:done], uniforms)
    body = payload.data[HEADER_BYTES:]
    buckets = codec._buckets(N)
    assert torch.equal(body[: 4 * (done // codec.bucket_size)].view(torch.float32), scales)
    packed = body[4 * buckets:][: done * codec.bits // 8]
    assert torch.equal(packed, bitpack.pack_tiled(codes, codec.bits))
    # one wire format: the fused and the eager decoder agree bit for bit
    fused = codec.decode(payload)
    kernels.set_enabled(False)
    assert torch.equal(fused, codec.decode(payload))
    eager_payload = codec.encode(x, torch.Generator().manual_seed(7))
    kernels.set_enabled(True)
    assert torch.equal(codec.decode(eager_payload), _decoded_eagerly(codec, eager_payload))


def _decoded_eagerly(codec, payload):
    kernels.set_enabled(False)
    try:
        return codec.decode(payload)
    finally:
        kernels.set_enabled(True)


@pytest.mark.parametrize("name", ["qsgd4", "dithering"])
def test_fused_path_is_unbiased_with_the_expected_variance(compiled, name):
    codec = CODECS[name]
    x = torch.randn(N, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    trials = 100
    errors = torch.stack([codec.decode(codec.encode(x, gen)) - x for _ in range(trials)])
    # unbiased: the mean error along random directions is within noise
    directions = torch.randn(4, N, generator=torch.Generator().manual_seed(4))
    projected = errors.double() @ directions.double().T  # trials x 4
    assert (projected.mean(0).abs() < 5 * projected.std(0) / math.sqrt(trials)).all()
    # the second moment is the one the rounding probabilities give (Codec.expected_sq_error)
    measured = errors.square().sum(1).mean()
    expected = codec.expected_sq_error(x)
    assert abs(measured / expected - 1) < 0.05, (measured, expected)


def test_qsgd_l2_variance_bound_on_the_fused_path(compiled):
    codec = cp.QSGD(bits=4, norm="l2")  # min(d/s^2, sqrt(d)/s) ||v||^2 per bucket (README, 'What the codecs compute')
    d, s = codec.bucket_size, codec.levels
    x = torch.randn(N, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    measured = torch.stack([(codec.decode(codec.encode(x, gen)) - x).square().sum()
                            for _ in range(30)]).mean()
    assert measured <= min(d / s ** 2, math.sqrt(d) / s) * x.square().sum()


@pytest.mark.parametrize("name", ["qsgd4", "qsgd2-128"])
def test_fused_decoder_into_any_output_matches_the_eager_one(compiled, name):
    """Any output (fp32 at odd and even offsets, strided, fp16, bf16) gets the eager
    decoder's values."""
    codec = CODECS[name]
    payload = codec.encode(torch.randn(N, generator=torch.Generator().manual_seed(11)))
    eager = _decoded_eagerly(codec, payload)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(codec.decode(payload, dtype=dtype), eager.to(dtype))
    room = torch.zeros(2 * N + 2)
    for out in (room[1:N + 1], room[2:N + 2], room[::2][:N]):  # odd and even offset, strided
        assert torch.equal(codec.decode_into(payload, out.fill_(7.0)), eager)
        start = torch.linspace(-1, 1, N)
        out.copy_(start)
        codec.decode_into(payload, out, alpha=0.25)
        assert torch.equal(out, start + eager * 0.25)  # Codec._store's rounding order


@pytest.mark.parametrize("name", ["qsgd4", "qsgd3", "natural"])
def test_fused_decoder_takes_each_calls_alpha(compiled, name):
    """The cached kernel must not keep the first call's ``alpha``: a process reduces over
    groups of several sizes (hierarchical: the node and the inter-node groups)."""
    codec = CODECS.get(name) or cp.NaturalCompression()
    payload = codec.encode(torch.randn(N, generator=torch.Generator().manual_seed(12)))
    eager = _decoded_eagerly(codec, payload)
    for alpha in (0.5, 0.25, 1 / 3, 0.5):
        out = torch.ones(N)
        codec.decode_into(payload, out, alpha=alpha)
        assert torch.equal(out, 1 + eager * alpha), alpha


def test_hashed_bits_are_uniform_and_keys_independent():
    key = torch.tensor([123, -456, 789, 1011], dtype=torch.int32)
    a = kernels.hashed_bits(key, 1 << 16, torch.device("cpu"), stream=0)
    b = kernels.hashed_bits(key, 1 << 16, torch.device("cpu"), stream=1)
    for column in a:  # the fourth column is made of the bits the other three leave
        assert column.min() >= 0 and column.max() < (1 << 23)
        counts = torch.bincount(column >> 19, minlength=16).double()  # 16 cells of the top bits
        assert ((counts - counts.mean()) ** 2 / counts.mean()).sum() < 40  # 15 dof: p < 1e-3
        low = torch.bincount(column & 15, minlength=16).double()  # low bits too
        assert ((low - low.mean()) ** 2 / low.mean()).sum() < 40
    values = torch.stack(a, 1).view(-1).double() / (1 << 23)  # in the order values take them
    other = torch.stack(b, 1).view(-1).double() / (1 << 23)
    assert abs(torch.corrcoef(torch.stack([values, other]))[0, 1]) < 0.01  # streams
    for lag in (1, 2, 3, 4):  # within a group of four, and across groups
        assert abs(torch.corrcoef(torch.stack([values[lag:], values[:-lag]]))[0, 1]) < 0.01
    # pairs of neighbours fill a 16 x 16 grid evenly
    cells = torch.bincount((values[:-1] * 16).long() * 16 + (values[1:] * 16).long(), minlength=256)
    expected = (values.numel() - 1) / 256
    assert ((cells.double() - expected) ** 2 / expected).sum() < 255 + 5 * math.sqrt(510)


def test_hashed_uniforms_are_uniform_on_their_grid_and_halves_independent():
    key = torch.tensor([321, -654], dtype=torch.int32)
    columns = kernels.hashed_uniforms(key, 1 << 17, 4, torch.device("cpu"))
    steps = torch.stack(columns).double().sub(1.0).mul(2 ** 16).sub(0.5)
    assert (steps == steps.round()).all() and steps.min() >= 0 and steps.max() < 2 ** 16
    for column in columns:
        counts = torch.bincount(((column - 1) * 16).long(), minlength=16).double()
        assert ((counts - counts.mean()) ** 2 / counts.mean()).sum() < 40  # p < 1e-3, 15 dof
    # the two halves of one hash, and columns from different hashes, are uncorrelated
    assert abs(torch.corrcoef(torch.stack(columns).double())[0, 1:]).max() < 0.01
    # counters do not repeat across groups: no two groups draw identical columns
    assert not torch.equal(columns[0][:1000], columns[0][1:1001])


def test_every_kernel_compiles_past_dynamos_recompile_limit(compiled):
    """Kernels of many codecs in one process each stay compiled: dynamo's recompile limit
    counts per code object, and the kernels are closures of a few functions. The limit is
    lowered through dynamo's own ``config.patch``: pytest's monkeypatch deletes a config entry
    on undo (pytest 9.2), after which every compile in the process fails."""
    from torch._dynamo.utils import counters
    counters.clear()
    x = torch.randn(kernels.MIN_NUMEL, generator=torch.Generator().manual_seed(3))
    with torch._dynamo.config.patch(recompile_limit=1):
        for codec in (cp.QSGD(bits=5), cp.QSGD(bits=6), cp.QSGD(bits=7, norm="l2")):
            out = torch.zeros_like(x)
            codec.decode_into(codec.encode(x), out, alpha=0.5)
            codec.decode(codec.encode(x))
    assert not any("recompile limit" in reason for reason in counters["unimplemented"])
    assert torch._dynamo.config.recompile_limit > 1  # restored for the tests after this one


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.enabled() and not kernels.usable(torch.device("cpu"), N)
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    assert kernels.enabled()
    kernels.set_enabled(False)
    try:
        assert not kernels.usable(torch.device("cpu"), N)
    finally:
        kernels.set_enabled(None)


def test_a_failing_compiler_falls_back_to_eager_once(monkeypatch, caplog, compiled):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")
    monkeypatch.setattr(kernels, "_kernels", {})
    monkeypatch.setattr(kernels, "_broken", {})
    monkeypatch.setattr(torch, "compile", broken)
    codec = cp.QSGD(bits=4)
    x = torch.randn(N)
    with caplog.at_level(logging.WARNING, logger="commpress.kernels"):
        first = codec.decode(codec.encode(x))
        codec.decode(codec.encode(x))
    failures = [r for r in caplog.records if "no C++ compiler here" in r.getMessage()]
    assert len(failures) == 2  # once for the encoder, once for the decoder, not per call
    assert (first - x).abs().max() <= x.abs().max() / codec.levels * 1.01


def _natural_codes_of_the_kernel(codec, x, seed):
    """``(e_top, codes)`` of C_nat with full rounding and the fused path's randomness: the
    hashed bits of groups of four (value ``4g + k`` takes column ``k`` of group ``g``), then
    the generator's bits for the last ``numel % 4`` values."""
    gen = torch.Generator().manual_seed(seed)
    key = kernels.draw_key(gen, x.device, streams=2)
    e_top = codec._largest_exponent(x) + 1
    whole = x.numel() // 4 * 4
    per_value = [torch.stack(kernels.hashed_bits(key, whole // 4, x.device, stream), 1).view(-1)
                 for stream in (0, 1)]
    codes = codec._codes(x[:whole].clone(), e_top, True, lambda stream: per_value[stream])
    tail = codec._codes(x[whole:].clone(), e_top, True,
                        lambda stream: random_bits(x.numel() - whole, x.device, gen))
    return e_top, torch.cat([codes, tail])


def test_fused_natural_compression_is_the_eager_code_with_hashed_randomness(compiled):
    codec = cp.NaturalCompression()
    x = torch.randn(N, generator=torch.Generator().manual_seed(8))
    x[3], x[4], x[5] = 0.0, math.inf, math.nan
    x[6:100] *= 1e-36  # far below the largest: the second, low-range rounding
    payload = codec.encode(x, torch.Generator().manual_seed(9))
    e_top, codes = _natural_codes_of_the_kernel(codec, x, seed=9)
    body = payload.data[HEADER_BYTES:]
    assert int(body[:4].view(torch.int32)) == int(e_top) and torch.equal(body[4:], codes)
    y = codec.decode(payload)
    assert y[3] == 0 and y[4] == math.inf and math.isnan(y[5])
    # one wire format: the fused decoder (arithmetic) and the eager one (a table) agree bit
    # for bit, also when accumulating into a sum
    assert torch.equal(y.view(torch.int32), _decoded_eagerly(codec, payload).view(torch.int32))
    fused_sum, eager_sum = torch.full((N,), 0.25), torch.full((N,), 0.25)
    codec.decode_into(payload, fused_sum, alpha=1 / 3)
    kernels.set_enabled(False)
    codec.decode_into(payload, eager_sum, alpha=1 / 3)
    kernels.set_enabled(True)
    assert torch.equal(fused_sum.view(torch.int32), eager_sum.view(torch.int32))
    # unbiased, with the exact second moment
    gen = torch.Generator().manual_seed(10)
    finite = x[6:]
    errors = torch.stack([codec.decode(codec.encode(finite, gen)) - finite for _ in range(60)])
    measured, expected = errors.square().sum(1).mean(), codec.expected_sq_error(finite)
    assert abs(measured / expected - 1) < 0.05
    direction = torch.randn(finite.numel(), generator=torch.Generator().manual_seed(11))
    projected = errors.double() @ direction.double()
    assert abs(projected.mean()) < 5 * projected.std() / math.sqrt(60)


@pytest.mark.parametrize("tiny", [False, True])
def test_fused_natural_compression_runs_the_low_range_step_only_when_a_value_needs_it(
        compiled, monkeypatch, tiny):
    """On the CPU the kernel without the low-range rounding runs first; only a value far
    enough below the largest makes it run again with it. The codes are those of the full
    rounding either way."""
    codec = cp.NaturalCompression()
    x = torch.randn(N, generator=torch.Generator().manual_seed(12))
    if tiny:
        x[7] = 1e-40  # a subnormal, more than 2^125 below the largest value
    runs = []
    run = codec._run_fused_encoder
    monkeypatch.setattr(codec, "_run_fused_encoder",
                        lambda *args: runs.append(args[-1]) or run(*args))
    payload = codec.encode(x, torch.Generator().manual_seed(13))
    assert runs == ([False, True] if tiny else [False])
    e_top, codes = _natural_codes_of_the_kernel(codec, x, seed=13)
    assert torch.equal(payload.data[HEADER_BYTES + 4:], codes)
    if tiny:  # rounded between zero and the smallest power of the range
        assert codec.decode(payload)[7].item() in (0.0, math.ldexp(1.0, int(e_top) - 125 - 127))


def test_natural_compression_code_bytes_and_values_match_their_definitions():
    """C_nat's arithmetic code bytes (encoder) and values (compiled decoder) against their
    definition, for every rounded exponent, sign and code byte, at several ``e_top``."""
    codec = cp.NaturalCompression()
    expo = torch.arange(256, dtype=torch.int32)
    for e in (1, 2, 60, 126, 127, 128, 200, 255):
        e_top = torch.tensor(e, dtype=torch.int32)
        for negative in (False, True):
            got = codec._code_bytes(expo, torch.full((256,), negative), e_top).tolist()
            for x, code in zip(expo.tolist(), got):
                low = 0 if x == 0 else 127 if x == 255 else max(x - e + 126, 0)
                assert code == (low | 0x80 if negative and low else low), (e, x, negative)
        values = codec._values(torch.arange(256, dtype=torch.int32), e_top).tolist()
        for code, value in enumerate(values):
            low, sign = code & 0x7F, -1.0 if code & 0x80 else 1.0
            if code == 0x80:
                assert math.isnan(value)
            elif low == 0:
                assert value == 0.0
            else:
                magnitude = math.inf if low == 127 else math.ldexp(1.0, e - 127 - 126 + low)
                # in fp32: zero below 2^-149, infinite from 2^128
                expected = torch.tensor(sign * magnitude, dtype=torch.float64).float().item()
                assert value == expected, (e, code)


@pytest.mark.parametrize("name", ["qsgd4", "qsgd3", "qsgd8", "dithering", "natural"])
@pytest.mark.parametrize("count", [1, 3])
def test_decode_mean_is_the_ordered_sum_of_decodes(compiled, name, count):
    """decode_mean (one kernel over every payload where the codec has one) gives the bits of
    zeroing and adding each decoded payload times 1/count in order, with the chosen rank's
    payload decoded into ``local``; a payload it cannot take is named by its index. The
    vector ends in a partial bucket: the kernel takes the whole buckets, the eager code the
    rest (the last pipeline piece of a vector; it decoded wholly eagerly, 2x slower)."""
    codec = CODECS.get(name) or cp.NaturalCompression()
    gen = torch.Generator().manual_seed(13)
    payloads = [codec.encode(torch.randn(N - 37, generator=gen), gen) for _ in range(count)]
    gathered = torch.cat([p.data for p in payloads])
    bodies = gathered.view(count, -1)[:, cp.codecs.wire.HEADER_BYTES:]
    covered = codec._decode_mean_body(bodies, torch.empty(N - 37), None, -1)
    assert covered == (N - 37) // codec.block_size * codec.block_size
    expected = torch.zeros(N - 37)
    for p in payloads:
        codec.decode_into(p, expected, 1 / count)
    out, local = torch.full((N - 37,), 7.0), torch.empty(N - 37)
    codec.decode_mean(gathered, count, out, local, count - 1)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(local, codec.decode(payloads[-1]))
    kernels.set_enabled(False)
    eager = codec.decode_mean(gathered, count, torch.empty(N - 37))
    kernels.set_enabled(True)
    assert torch.equal(eager.view(torch.int32), expected.view(torch.int32))
    wrong = gathered.clone()
    wrong[(count - 1) * payloads[0].nbytes] = 0  # the last payload's magic
    with pytest.raises(cp.codecs.PayloadError, match=f"payload {count - 1}"):
        codec.decode_mean(wrong, count, out)
    with pytest.raises(ValueError, match=f"rank {count} names none"):
        codec.decode_mean(gathered, count, out, local, count)


@pytest.mark.parametrize("name", ["qsgd4", "qsgd2-128", "dithering", "natural", "qsgd4-l2"])
def test_fused_expected_squared_error_matches_the_eager_sum(compiled, name):
    """EF21's contractive factor reads the codec's expected squared error every step: the
    compiled whole-bucket pass (a ragged tail eagerly) gives the eager slices' sum to fp32
    rounding, over values from subnormal to 1e30, zeros included."""
    codec = {"natural": cp.NaturalCompression(), "qsgd4-l2": cp.QSGD(bits=4, norm="l2")}.get(
        name) or CODECS[name]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, generator=gen) * torch.logspace(-44, 30, N)
    x[::97] = 0.0
    fused = codec.expected_sq_error(x)
    kernels.set_enabled(False)
    eager = codec.expected_sq_error(x)
    kernels.set_enabled(True)
    assert fused.dtype == torch.float32 and fused.dim() == 0
    assert torch.allclose(fused, eager, rtol=1e-5, atol=0), (fused, eager)
    assert any(k[0] == "sq_error" and k[1] == repr(codec) for k in kernels._kernels), \
        "the compiled pass did not run"


@pytest.mark.parametrize("codec", [cp.QSGD(bits=4, bucket_size=2048), cp.NaturalCompression()],
                         ids=["qsgd4-2048", "natural"])
def test_pieces_of_a_large_vector_take_the_kernels(compiled, monkeypatch, codec):
    """A piece under MIN_NUMEL runs the eager code (a first compile costs seconds, which a
    small model would not repay), unless it is a piece of a vector being reduced that is at
    least MIN_NUMEL (reduce-scatter chunks: a piece over the world size); then down to
    PIECE_MIN_NUMEL it takes the kernels, decoding to the eager code's bits. The choice
    depends on sizes only, not on what the process compiled before (resumes draw alike)."""
    ran, real = [], kernels.run
    monkeypatch.setattr(kernels, "run", lambda key, *args: ran.append(key[0]) or real(key, *args))
    gen = torch.Generator().manual_seed(3)
    small = torch.randn(kernels.PIECE_MIN_NUMEL * 2, generator=gen)
    codec.decode(codec.encode(torch.randn(kernels.MIN_NUMEL, generator=gen), gen))  # compiled
    ran.clear()
    payload = codec.encode(small, gen)
    codec.decode(payload)
    assert ran == []
    with kernels.reducing(kernels.MIN_NUMEL):
        fused = codec.decode(payload)
        codec.encode(small, gen)
        assert "encode" in ran and "decode" in ran, ran
        ran.clear()
        codec.decode(codec.encode(small[: kernels.PIECE_MIN_NUMEL // 2], gen))
        assert ran == []
        with kernels.reducing(kernels.MIN_NUMEL - 1):  # nested: the inner vector's size
            codec.decode(payload)
            assert ran == []
        codec.decode(payload)
        assert ran == ["decode"]
    assert torch.equal(fused, codec.decode(payload))


def test_compressed_mean_reduces_its_pieces_with_the_kernels(compiled, monkeypatch):
    """The collectives mark the vector they reduce: reduce_scatter's chunks of a 512K-value
    vector over 4 ranks (128K values each) take the kernels."""
    from commpress.comm import compressed_mean
    from commpress.comm.loopback import LoopbackGroup
    ran, real = [], kernels.run
    monkeypatch.setattr(kernels, "run", lambda key, *args: ran.append(key[0]) or real(key, *args))
    codec = cp.QSGD(bits=4)
    xs = [torch.randn(kernels.MIN_NUMEL * 2, generator=torch.Generator().manual_seed(r)) for r in range(4)]
    means = LoopbackGroup(4).run(lambda t: compressed_mean(xs[t.rank].clone(), Channel(codec, t),
                                                           "reduce_scatter")[0])
    assert ran.count("encode") >= 8 and "decode_mean" in ran, ran
    assert all(torch.equal(m, means[0]) for m in means)
    exact = torch.stack(xs).mean(0)
    assert (means[0] - exact).norm() < 0.5 * exact.norm()  # QSGD-4 twice: about 0.3
