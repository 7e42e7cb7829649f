"""Values at the ends of the fp32 range: finite in, finite out wherever the true mean is
finite; tiny magnitudes are not rounded to zero. In-process ranks (loopback transport)."""
import math

import pytest
import torch

import commpress as cp
from commpress.comm import Channel, Layout, LoopbackGroup, compressed_mean

BIG_CODECS = {"identity": cp.Identity(), "qsgd4": cp.QSGD(bits=4), "qsgd4-l2": cp.QSGD(bits=4, norm="l2"),
              "natural": cp.NaturalCompression(), "dnat-l2": cp.NaturalDithering(p=2),
              "dnat": cp.NaturalDithering(), "bf16": cp.BF16()}


@pytest.mark.parametrize("name,algorithm", [
    (name, algorithm) for name in sorted(BIG_CODECS)
    for algorithm in ("allgather", "reduce_scatter", "allreduce")
    if algorithm != "allreduce" or BIG_CODECS[name].summable])
@pytest.mark.parametrize("value", [2e38, 1e38, -3e38])
def test_large_finite_means_stay_finite(name, algorithm, value):
    codec = BIG_CODECS[name]
    x = torch.full((1024,), value)
    x[::3] = value / 2

    def rank_fn(transport):
        gen = torch.Generator().manual_seed(transport.rank)
        return compressed_mean(x.clone(), Channel(codec, transport, gen), algorithm)[0]

    for mean in LoopbackGroup(3).run(rank_fn):
        assert torch.isfinite(mean).all(), (name, algorithm, mean[:4])
        # and near the truth on the whole (single draws of a stochastic codec are coarse;
        # C_nat rounds the top binade down to 2^127)
        assert abs(mean.double().sum() / x.double().sum() - 1) < 0.5


@pytest.mark.parametrize("name", ["qsgd4-l2", "dnat-l2"])
def test_l2_norm_of_huge_bucket_round_trips_finite(name):
    x = torch.full((512,), 1e38)
    out = BIG_CODECS[name].decode(BIG_CODECS[name].encode(x))
    assert torch.isfinite(out).all()


def test_natural_compression_top_binade_is_finite():
    codec = cp.NaturalCompression()
    x = torch.tensor([3e38, -3.4e38, 1.7e38, math.inf, -math.inf])
    out = codec.decode(codec.encode(x))
    assert torch.isfinite(out[:3]).all() and out[3] == math.inf and out[4] == -math.inf


@pytest.mark.parametrize("codec", [cp.QSGD(bits=4), cp.QSGD(bits=2, bucket_size=128),
                                   cp.QSGD(bits=4, norm="l2"), cp.NaturalDithering(),
                                   cp.NaturalCompression()], ids=repr)
@pytest.mark.parametrize("scale", [1e-39, 1e-42, 3e-38])
def test_tiny_magnitudes_stay_unbiased(codec, scale):
    """A bucket whose largest value is below ~2e-38 decodes unbiased, not to all zeros."""
    x = torch.rand(512, generator=torch.Generator().manual_seed(0)) * scale
    gen = torch.Generator().manual_seed(1)
    trials = 400
    totals = torch.stack([codec.decode(codec.encode(x, gen)).double().sum() for _ in range(trials)])
    exact = x.double().sum()
    assert totals.mean() > 0
    z = (totals.mean() - exact) / (totals.std() / trials ** 0.5)
    assert abs(z) < 5, (z, totals.mean() / exact)


@pytest.mark.parametrize("codec", [cp.QSGD(bits=4), cp.NaturalCompression(), cp.FP16(), cp.QSGD(bits=3)],
                         ids=repr)
def test_strided_payload_view_decodes(codec):
    x = torch.randn(1000)
    data = codec.encode(x, torch.Generator().manual_seed(0)).data
    spread = torch.zeros(2 * data.numel(), dtype=torch.uint8)
    spread[::2] = data
    strided = spread[::2]
    assert not strided.is_contiguous()
    assert torch.equal(codec.decode(cp.Payload(strided)), codec.decode(cp.Payload(data)))


FP16_NEAR_MAX_CODECS = {"qsgd4": cp.QSGD(bits=4), "qsgd4-l2": cp.QSGD(bits=4, norm="l2"),
                        "qsgd8-l2": cp.QSGD(bits=8, norm="l2"), "natural": cp.NaturalCompression(),
                        "dnat": cp.NaturalDithering(), "dnat-l2": cp.NaturalDithering(p=2)}


def fp16_near_max():
    x = torch.full((20480,), 40000.0, dtype=torch.float16)
    x[::3] = 60000.0
    x[1::7] = -65504.0
    return x


@pytest.mark.parametrize("name", sorted(FP16_NEAR_MAX_CODECS))
def test_fp16_near_its_maximum_decodes_finite(name):
    """Rounded one level up, values near 65504 passed fp16's range and decoded to inf."""
    codec, x = FP16_NEAR_MAX_CODECS[name], fp16_near_max()
    out = codec.decode(codec.encode(x, generator=torch.Generator().manual_seed(0)))
    assert out.dtype == torch.float16 and torch.isfinite(out).all(), name


@pytest.mark.parametrize("name", sorted(FP16_NEAR_MAX_CODECS))
def test_fp16_gradients_near_their_maximum_reduce_finite(name):
    """The mean written back into fp16 gradients (a DDP bucket, MPI and Horovod arrays) through
    Segments saturates where the fp32 mean passed the range."""
    from commpress.comm import reduce_gradient
    from commpress.comm.segments import Segments
    codec = FP16_NEAR_MAX_CODECS[name]

    def rank_fn(transport):
        grads = [fp16_near_max()[:8192].clone(), fp16_near_max()[8192:].clone()]
        gen = torch.Generator().manual_seed(transport.rank)
        reduce_gradient(Segments(grads), Layout([0, 1]), Channel(codec, transport, gen),
                        collective="allgather", feedback=None)
        return torch.cat(grads)

    for mean in LoopbackGroup(2).run(rank_fn):
        assert mean.dtype == torch.float16 and torch.isfinite(mean).all(), name


def test_saturating_cast_keeps_infinities_and_nans():
    values = torch.tensor([1e6, -1e6, float("inf"), float("-inf"), float("nan"), 1.5])
    out = cp.codecs.saturating_cast(values, torch.float16)
    assert out[:2].tolist() == [65504.0, -65504.0]
    assert out[2] == float("inf") and out[3] == float("-inf") and out[4].isnan() and out[5] == 1.5
