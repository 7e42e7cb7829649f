"""Codec behaviour: formats and sizes, edge inputs, and the statistics the papers promise.

Monte Carlo checks use fixed seeds and tolerances in standard errors of the estimate.
"""
import math

import pytest
import torch

import commpress as cp
from commpress.codecs import HEADER_BYTES, bitpack

ALL_CODECS = [
    cp.QSGD(bits=1, bucket_size=128), cp.QSGD(bits=2, bucket_size=128), cp.QSGD(bits=3, bucket_size=100),
    cp.QSGD(bits=4),
    cp.QSGD(bits=8, norm="l2"), cp.NaturalCompression(), cp.NaturalDithering(),
    cp.NaturalDithering(levels=3, p=2, bucket_size=64), cp.Identity(), cp.FP16(), cp.BF16(),
    cp.Rotated(cp.QSGD(bits=2, bucket_size=128)), cp.Rotated(cp.NaturalDithering(), block=64),
    cp.ScaledSign(bucket_size=64), cp.Rotated(cp.ScaledSign()),
    cp.EliasQSGD(levels=1), cp.EliasQSGD(levels=5, bucket_size=100, norm="max"),
]
STOCHASTIC = [c for c in ALL_CODECS if c.stochastic]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def codec_id(codec):
    return repr(codec)


def expected_wire_bytes(codec, n):
    """The bits-per-entry formulas of README (What the codecs compute), written independently of the codecs."""
    if isinstance(codec, cp.Rotated):  # the inner codec's body under a header of its own
        return expected_wire_bytes(codec.inner, n)
    if isinstance(codec, (cp.QSGD, cp.NaturalDithering)):
        return HEADER_BYTES + 4 * math.ceil(n / codec.bucket_size) + math.ceil(n * codec.bits / 8)
    if isinstance(codec, cp.NaturalCompression):
        return HEADER_BYTES + 4 + n
    if isinstance(codec, cp.ScaledSign):
        return HEADER_BYTES + 4 * math.ceil(n / codec.bucket_size) + math.ceil(n / 8)
    return HEADER_BYTES + n * {"identity": 4, "fp16": 2, "bf16": 2}[codec.name]


@pytest.mark.parametrize("codec", ALL_CODECS, ids=codec_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5, 7), (1031,), (2, 0, 3)])
def test_round_trip_keeps_shape_dtype_and_size(codec, dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    payload = codec.encode(x)
    assert payload.data.dtype == torch.uint8 and payload.data.dim() == 1
    assert payload.data.is_contiguous()
    if codec.variable_length:  # the data decides; wire_bytes is the bound
        assert payload.nbytes <= codec.wire_bytes(x.numel())
    else:
        assert payload.nbytes == codec.wire_bytes(x.numel()) == expected_wire_bytes(codec, x.numel())
    y = codec.decode(payload)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y).all()
    if isinstance(codec, cp.Identity):
        assert torch.equal(y, x)


def test_documented_compression_ratios():
    n = 1 << 20
    assert n * 4 / cp.QSGD(bits=4, bucket_size=512).wire_bytes(n) == pytest.approx(7.88, abs=0.01)
    assert n * 4 / cp.QSGD(bits=8, bucket_size=512).wire_bytes(n) == pytest.approx(3.97, abs=0.01)
    assert n * 4 / cp.NaturalCompression().wire_bytes(n) == pytest.approx(4.0, abs=0.001)
    assert cp.NaturalDithering(levels=7).bits == 4
    assert cp.NaturalDithering(levels=8).bits == 5
    assert cp.QSGD(bits=4).levels == 7 and cp.QSGD(bits=2).levels == 1


def test_non_contiguous_input():
    x = torch.randn(64, 33).t()
    assert torch.equal(cp.Identity().decode(cp.Identity().encode(x)), x)
    assert cp.QSGD(bits=8).decode(cp.QSGD(bits=8).encode(x)).shape == x.shape


@pytest.mark.parametrize("codec", ALL_CODECS, ids=codec_id)
def test_non_finite_stays_non_finite_and_zero_stays_zero(codec):
    d = max(getattr(codec, "bucket_size", 1), codec.block_size)  # a rotation mixes a block
    x = torch.randn(6 * max(d, 8))
    x[:max(d, 8)] = 0.0                               # a whole zero bucket
    bad = {max(d, 8) + 3: math.nan, 3 * max(d, 8) + 1: math.inf, 5 * max(d, 8): -math.inf}
    for i, v in bad.items():
        x[i] = v
    y = codec.decode(codec.encode(x))
    assert torch.equal(y[:max(d, 8)], torch.zeros(max(d, 8)))
    for i in bad:
        assert not torch.isfinite(y[i]), f"{codec!r} turned x[{i}]={x[i]} into {y[i]}"
    if isinstance(codec, (cp.NaturalCompression, cp.Identity, cp.FP16, cp.BF16)):
        assert torch.isnan(y[max(d, 8) + 3]) and y[3 * max(d, 8) + 1] == math.inf
        assert y[5 * max(d, 8)] == -math.inf


@pytest.mark.parametrize("codec", STOCHASTIC, ids=codec_id)
def test_generator_seed_determines_payload(codec):
    x = torch.randn(5000)
    enc = lambda seed: codec.encode(x, generator=torch.Generator().manual_seed(seed)).data
    assert torch.equal(enc(3), enc(3))
    assert not torch.equal(enc(3), enc(4))


def monte_carlo(codec, x, trials, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([codec.decode(codec.encode(x, generator=g)) for _ in range(trials)])


@pytest.mark.parametrize("codec", STOCHASTIC, ids=codec_id)
def test_unbiased(codec):
    """E[decode(encode(x))] = x, tested along 64 random directions w: each Monte Carlo mean of
    w.(y - x) is within 5 standard errors of zero. (Per-coordinate tests are unreliable: a
    coordinate that rounds up with probability 1e-4 shows no variance in a few thousand trials.)
    """
    g = torch.Generator().manual_seed(7)
    scales = torch.logspace(-3, 1, 517 // 32 + 1).repeat_interleave(32)[:517]
    x = torch.randn(517, generator=g) * scales               # tail bucket, mixed scales
    samples = monte_carlo(codec, x, trials=3000).double()
    directions = torch.randn(517, 64, generator=g, dtype=torch.float64) / scales.double().unsqueeze(1)
    proj = (samples - x.double()) @ directions
    se = proj.std(dim=0) / math.sqrt(samples.shape[0])
    z = proj.mean(dim=0) / se
    assert z.abs().max() < 5, z.abs().max()
    assert z.pow(2).mean() < 1.5                             # z-scores look standard normal
    assert torch.isfinite(samples).all()


def qsgd_exact_variance(x, levels, d, norm):
    """Closed-form variance of the QSGD quantizer, per bucket."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, (-n) % d)).view(-1, d).double()
    scale = blocks.abs().amax(1) if norm == "max" else blocks.norm(dim=1)
    t = blocks.abs() / scale.clamp_min(1e-300).unsqueeze(1) * levels
    frac = t - t.floor()
    return ((scale / levels).pow(2).unsqueeze(1) * frac * (1 - frac)).sum(1), blocks.pow(2).sum(1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("norm", ["max", "l2"])
def test_qsgd_variance_bound(bits, norm):
    d = 64
    codec = cp.QSGD(bits=bits, bucket_size=d, norm=norm)
    s = codec.levels
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randn(d, generator=g), torch.rand(d, generator=g),
                   torch.randn(d, generator=g).pow(3), torch.randn(d // 2, generator=g)])
    samples = monte_carlo(codec, x, trials=2000).double()
    sq_err = (samples - x.double()).pow(2)
    blocks = torch.nn.functional.pad(sq_err, (0, (-x.numel()) % d)).view(2000, -1, d).sum(2)
    mean, se = blocks.mean(0), blocks.std(0) / math.sqrt(2000)
    exact, sq_norm = qsgd_exact_variance(x, s, d, norm)
    assert ((mean - exact).abs() <= 5 * se + 1e-12).all()          # the quantizer is QSGD's
    bound = min(d / s ** 2, math.sqrt(d) / s) * sq_norm
    assert (exact <= bound).all() and (mean <= bound + 5 * se).all()  # and meets the paper's bound


@pytest.mark.parametrize("norm", ["max", "l2"])
def test_one_bit_qsgd_sends_signs_with_the_two_point_variance(norm):
    """One bit is the sign alone: every entry decodes to -scale or +scale, +scale with
    probability (1 + x/scale) / 2, so the variance is scale^2 - x^2 per entry, at most
    (d - 1) ||v||^2 per bucket (scale <= ||v||); and the payload is bits plus one scale."""
    d = 64
    codec = cp.QSGD(bits=1, bucket_size=d, norm=norm)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(d, generator=g), torch.rand(d, generator=g), torch.randn(d // 2, generator=g)])
    assert codec.wire_bytes(x.numel()) == HEADER_BYTES + 4 * 3 + x.numel() // 8
    samples = monte_carlo(codec, x, trials=2000).double()
    blocks = torch.nn.functional.pad(x, (0, (-x.numel()) % d)).view(-1, d)
    scale = (blocks.abs().amax(1) if norm == "max" else blocks.norm(dim=1)).double()
    blocks = blocks.double()
    per_value = scale.repeat_interleave(d)[: x.numel()]
    assert torch.allclose(samples.abs(), per_value.expand_as(samples), rtol=1e-6, atol=0)  # two points
    p_up = (samples > 0).double().mean(0)
    expected = (1 + x.double() / per_value) / 2
    assert ((p_up - expected).abs() <= 5 * (expected * (1 - expected) / 2000).sqrt() + 1e-9).all()
    exact = torch.nn.functional.pad(per_value.pow(2) - x.double().pow(2), (0, (-x.numel()) % d))
    exact = exact.view(-1, d).sum(1)
    sq_err = torch.nn.functional.pad((samples - x.double()).pow(2), (0, (-x.numel()) % d))
    sq_err = sq_err.view(2000, -1, d).sum(2)
    assert ((sq_err.mean(0) - exact).abs() <= 5 * sq_err.std(0) / math.sqrt(2000) + 1e-9).all()
    assert (exact <= (d - 1) * blocks.pow(2).sum(1) * (1 + 1e-6)).all()  # equal for l2, full buckets
    assert codec.expected_sq_error(x).item() == pytest.approx(exact.sum().item(), rel=1e-4)


@pytest.mark.parametrize("codec", [c for c in STOCHASTIC if not isinstance(c, cp.Rotated)]
                         + [cp.QSGD(bits=8), cp.QSGD(bits=6)], ids=codec_id)  # levels, unrotated
def test_values_on_a_level_decode_exactly(codec):
    """Entries equal to the bucket norm never round past the top level, even when the random
    draw is within float rounding of 1 (a 2^-18 event per entry: 2^21 entries catch it)."""
    x = torch.full((1 << 21,), -0.75)
    y = codec.decode(codec.encode(x, generator=torch.Generator().manual_seed(0)))
    if isinstance(codec, cp.NaturalCompression):  # -0.75 is not a power of two
        assert set(y.unique().tolist()) <= {-0.5, -1.0}
    elif codec.norm == "max":
        assert torch.equal(y, x)
    assert torch.isfinite(y).all()


def test_natural_compression_outputs_signed_powers_of_two():
    x = torch.randn(100_000) * torch.logspace(-15, 15, 100_000)  # within C_nat's 2^125 span
    y = cp.NaturalCompression().decode(cp.NaturalCompression().encode(x))
    nonzero = y[y != 0]
    mant, _ = torch.frexp(nonzero)
    assert (mant.abs() == 0.5).all()
    assert (torch.sign(nonzero) == torch.sign(x[y != 0])).all()
    # each value went to one of the powers of two around it
    lower = torch.exp2(torch.floor(torch.log2(x.abs().double())))
    assert ((y.abs().double() == lower) | (y.abs().double() == 2 * lower)).all()


def test_natural_compression_second_moment_bound_is_tight():
    codec, trials = cp.NaturalCompression(), 20_000
    k = torch.arange(-10, 11, dtype=torch.float32)
    tight = 4 / 3 * torch.exp2(k)
    others = torch.rand(21, generator=torch.Generator().manual_seed(0)) * torch.exp2(k) + torch.exp2(k)
    x = torch.cat([tight, -others])
    samples = monte_carlo(codec, x, trials).double()
    ratio = samples.pow(2) / x.double().pow(2)
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(trials)
    assert (mean <= 9 / 8 + 5 * se).all()
    assert ((mean[:21] - 9 / 8).abs() <= 5 * se[:21]).all()


def test_natural_dithering_levels():
    codec = cp.NaturalDithering(levels=4, bucket_size=16)
    x = torch.randn(160)
    y = codec.decode(codec.encode(x)).view(-1, 16)
    norms = x.view(-1, 16).abs().amax(1, keepdim=True)
    allowed = torch.tensor([0, 1 / 8, 1 / 4, 1 / 2, 1])
    ratios = (y / norms).abs()
    assert torch.isclose(ratios.unsqueeze(-1), allowed, atol=1e-6).any(-1).all()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 1001])
def test_bitpack_round_trip(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8)
    packed = bitpack.pack(codes, bits)
    assert packed.numel() == bitpack.packed_bytes(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(bitpack.unpack(packed, n, bits), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 5, 128, 128 * 3 + 37, 4096])
def test_tiled_bitpack_round_trip(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8)
    packed = bitpack.pack_tiled(codes, bits)
    assert packed.numel() == bitpack.packed_bytes(n, bits)
    assert torch.equal(bitpack.unpack_tiled(packed, n, bits), codes)


def test_tiled_bitpack_layout():
    """Group j of a tile packs codes LANES apart; byte b of its word lies LANES * b further;
    codes after the last whole tile are packed in order."""
    lanes = bitpack.LANES
    codes = (torch.arange(2 * lanes + 2) % 16).to(torch.uint8)
    packed = bitpack.pack_tiled(codes, 4).tolist()
    assert packed[:lanes] == [j | (j << 4) for j in range(lanes)]
    assert packed[lanes:] == [0 | (1 << 4)]
    codes = torch.randint(0, 8, (8 * lanes,), dtype=torch.uint8)  # 3 bits: 3 bytes per group
    tile = bitpack.pack_tiled(codes, 3).view(3, lanes)
    for j in range(lanes):
        assert tile[:, j].tolist() == bitpack.pack(codes[j::lanes], 3).tolist()


def test_bitpack_layout_is_little_endian():
    assert bitpack.pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert bitpack.pack(torch.tensor([5, 3], dtype=torch.uint8), 3).tolist() == [0b00011101]


def test_bad_arguments_are_named():
    for bits in (0, 9, True, 4.0):
        with pytest.raises(ValueError, match=r"QSGD bits must be an integer in 1\.\.8"):
            cp.QSGD(bits=bits)
    for bucket_size in (0, True, 2 ** 32, 512.0):  # the too large one too, by its range
        with pytest.raises(ValueError, match=r"bucket_size must be an integer in 1\.\.2\*\*32 - 1"):
            cp.QSGD(bits=4, bucket_size=bucket_size)
    with pytest.raises(ValueError, match="norm"):
        cp.QSGD(bits=4, norm="l1")
    with pytest.raises(ValueError, match="p=2 or p=inf"):
        cp.NaturalDithering(p=1)
    with pytest.raises(ValueError, match="unknown codec"):
        cp.get_codec("topk")
    with pytest.raises(TypeError, match="int64"):
        cp.QSGD().encode(torch.arange(10))
    with pytest.raises(TypeError, match="dense .strided. tensors, got torch.sparse_coo"):
        cp.QSGD().encode(torch.randn(10).to_sparse())  # not torch's "reshape is not implemented"
    with pytest.raises(TypeError, match="hold data, got a meta tensor"):
        cp.NaturalCompression().encode(torch.empty(10, device="meta"))  # not "Cannot copy out"
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        cp.QSGD().encode(torch.randn(10), generator=0)
    payload = cp.QSGD().encode(torch.randn(10))
    for dtype in (5, torch.int32, "float32"):
        with pytest.raises(TypeError, match="decode's dtype must be a floating torch.dtype"):
            cp.QSGD().decode(payload, dtype=dtype)
    for numel in (-1, 10.0, True):
        with pytest.raises(TypeError, match="decode's numel must be a non-negative int"):
            cp.QSGD().decode(payload, dtype=torch.float32, numel=numel)
    assert cp.get_codec("qsgd", bits=8) == cp.QSGD(bits=8)
    assert cp.get_codec("cnat") == cp.NaturalCompression()


@pytest.mark.parametrize("codec", ALL_CODECS, ids=codec_id)
def test_decode_rejects_truncated_foreign_and_corrupted_headers(codec):
    payload = codec.encode(torch.randn(300))
    data = payload.data
    with pytest.raises(ValueError, match="truncated"):
        codec.decode(cp.Payload(data[:-1]))
    with pytest.raises(ValueError, match="trailing"):
        codec.decode(cp.Payload(torch.cat([data, data[:1]])))
    with pytest.raises(ValueError, match="truncated"):
        codec.decode(cp.Payload(data[:10]))
    corrupted = data.clone()
    corrupted[9] ^= 0x10
    with pytest.raises(ValueError, match="corrupted"):
        codec.decode(cp.Payload(corrupted))
    other = cp.QSGD(bits=5) if not isinstance(codec, cp.QSGD) else cp.NaturalCompression()
    with pytest.raises(ValueError, match="codec id|parameters"):
        other.decode(payload)
    if isinstance(codec, cp.QSGD):
        with pytest.raises(ValueError, match="parameters"):
            cp.QSGD(bits=codec.bits, bucket_size=codec.bucket_size + 1).decode(payload)
    with pytest.raises(ValueError, match="shape"):
        codec.decode(cp.Payload(data, torch.Size([301])))


@pytest.mark.parametrize("codec", ALL_CODECS, ids=codec_id)
def test_decode_fuzz_only_value_error(codec):
    """1,500 random and mutated payloads per codec (15,000 in all): decoding either succeeds
    with the right length or raises ValueError, nothing else."""
    g = torch.Generator().manual_seed(hash(repr(codec)) % 2 ** 31)
    valid = [c.encode(torch.randn(n)).data for c in ALL_CODECS for n in (0, 1, 100, 513)]
    for i in range(1500):
        kind = i % 3
        if kind == 0:
            data = torch.randint(0, 256, (int(torch.randint(0, 200, (1,), generator=g)),),
                                 dtype=torch.uint8, generator=g)
        else:
            data = valid[int(torch.randint(0, len(valid), (1,), generator=g))].clone()
            if kind == 1 and data.numel():   # flip random bytes anywhere
                idx = torch.randint(0, data.numel(), (3,), generator=g)
                data[idx] = torch.randint(0, 256, (3,), dtype=torch.uint8, generator=g)
            else:                            # cut or extend
                cut = int(torch.randint(0, data.numel() + 8, (1,), generator=g))
                data = torch.cat([data, data])[:cut]
        try:
            out = codec.decode(cp.Payload(data))
        except ValueError:
            continue
        assert out.dim() == 1 and out.numel() == cp.codecs.wire.Header.from_bytes(
            bytes(data[:HEADER_BYTES].numpy())).numel


def test_codec_registry_refuses_taken_names_and_ids():
    from commpress.codecs.registry import register_codec

    with pytest.raises(ValueError, match="codec id 4"):
        @register_codec("my-qsgd")
        class Clash(cp.QSGD):
            codec_id = 4
            name = "clash"
    with pytest.raises(ValueError, match="'qsgd' is already QSGD"):
        @register_codec("qsgd")
        class Other(cp.Identity):
            codec_id = 99
    assert cp.get_codec("qsgd", bits=4) == cp.QSGD(bits=4)


@pytest.mark.parametrize("codec", [cp.QSGD(bits=2, bucket_size=128), cp.QSGD(bits=4),
                                   cp.QSGD(bits=3, norm="l2"), cp.NaturalDithering(),
                                   cp.NaturalDithering(levels=3, p=2), cp.NaturalCompression(),
                                   cp.Rotated(cp.QSGD(bits=4), block=128)],
                         ids=repr)
def test_expected_sq_error_matches_monte_carlo(codec):
    """What EF21 scales by: E||C(x) - x||^2, computed from the rounding probabilities."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 3000)
    x[::7] = 0  # zeros round to zero exactly
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([(codec.decode(codec.encode(x, gen)) - x).double().square().sum()
                           for _ in range(300)])
    exact = codec.expected_sq_error(x).double()
    assert abs(samples.mean() - exact) < 5 * samples.std() / 300 ** 0.5 + 1e-9 * exact
    assert cp.FP16().expected_sq_error(x) is None


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_an_all_zero_bucket_adds_no_expected_error(bits):
    """Zeros encode exactly (scale 0); one sign per entry must not count them as +-1."""
    codec = cp.QSGD(bits=bits, bucket_size=128)
    x = torch.randn(512, generator=torch.Generator().manual_seed(0))
    with_zeros = torch.cat([x, torch.zeros(3 * 128)])
    assert codec.expected_sq_error(with_zeros).item() == pytest.approx(
        codec.expected_sq_error(x).item(), rel=1e-6)
    assert torch.equal(codec.decode(codec.encode(with_zeros))[512:], torch.zeros(3 * 128))


def test_wrong_codec_errors_name_the_codec():
    payload = cp.QSGD(bits=4).encode(torch.randn(16))
    with pytest.raises(ValueError, match=r"encoded by qsgd \(codec id 4\), not by natural"):
        cp.NaturalCompression().decode(payload)


@pytest.mark.parametrize("codec", [cp.QSGD(bits=4), cp.NaturalCompression(), cp.FP16()],
                         ids=lambda c: c.name)
def test_unknown_format_version_and_meta_payloads_are_refused_by_name(codec):
    import struct
    import zlib
    from commpress.codecs.wire import FORMAT_VERSION, Payload
    payload = codec.encode(torch.randn(1000), generator=torch.Generator().manual_seed(0))
    data = payload.data.clone()
    data[2] = FORMAT_VERSION + 1  # a later release's payload, with a valid CRC
    crc = struct.pack("<I", zlib.crc32(bytes(data[:20].numpy())))
    data[20:24] = torch.frombuffer(bytearray(crc), dtype=torch.uint8)
    for decode in (lambda p: codec.decode(p), lambda p: codec.decode(p, torch.float32, 1000),
                   lambda p: codec.decode_into(p, torch.zeros(1000))):
        with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
            decode(Payload(data, payload.shape))
    with pytest.raises(TypeError, match="meta device holds no bytes"):  # not NotImplementedError
        codec.decode(Payload(payload.data.to("meta"), payload.shape))


def test_ranks_agree_on_the_payload_format():
    """Decoders on an accelerator trust the agreement instead of each header: the format is in it."""
    from commpress.codecs.wire import FORMAT_VERSION
    from commpress.config import CompressionConfig
    assert CompressionConfig(cp.QSGD()).shared()["wire_format"] == FORMAT_VERSION
