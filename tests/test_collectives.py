"""Compressed collectives on real gloo process groups of 2, 3 and 4 ranks."""
import math

import pytest
import torch
import torch.distributed as dist

import commpress as cp
from commpress.codecs import kernels
from commpress.comm import (Channel, FeedbackBuffers, Layout, TorchTransport, choose_algorithm,
                           chunk_bounds, compressed_mean, wire_bytes_per_rank)
from commpress.comm.collectives import start_mean
from commpress.comm.segments import Segments
from distributed import run_workers

CODECS = {"qsgd4": cp.QSGD(bits=4, bucket_size=128), "qsgd1": cp.QSGD(bits=1, bucket_size=128),
          "natural": cp.NaturalCompression(),
          "dithering": cp.NaturalDithering(bucket_size=128)}


def exactness_worker(rank, world_size):
    transport = TorchTransport()
    out = {}
    # not divisible by W nor by any block size; the last spans three pipelined pieces
    for n in (1, 7, 1000, 12_345, 2_500_001):
        x = torch.randn(n, generator=torch.Generator().manual_seed(100 * rank + n))
        exact = x.clone()
        dist.all_reduce(exact)
        exact /= world_size
        for algorithm in ("allgather", "reduce_scatter", "allreduce"):
            mean, local = compressed_mean(x, Channel(cp.Identity(), transport), algorithm,
                                          keep_local=True)
            out[(n, algorithm)] = ((mean - exact).abs().max().item(),
                                     torch.allclose(local, x, rtol=1e-6, atol=0), mean)
    return out


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_identity_codec_matches_all_reduce(world_size):
    results = run_workers(exactness_worker, world_size)
    for key in results[0]:
        for r in range(world_size):
            err, local_ok, mean = results[r][key]
            assert err <= 1e-6 and local_ok, (key, r, err)
            assert torch.equal(mean, results[0][key][2]), "ranks disagree"


def unbiased_worker(rank, world_size, trials):
    transport = TorchTransport()
    n = 700
    x = torch.randn(n, generator=torch.Generator().manual_seed(rank)) * (1 + rank)
    exact = x.clone()
    dist.all_reduce(exact)
    exact /= world_size
    gen = torch.Generator().manual_seed(1000 + rank)
    out = {}
    for name, codec in CODECS.items():
        for algorithm in ("allgather", "reduce_scatter"):
            # the ranks agree on the first trial; the others are the same call (agreed)
            samples = torch.stack([compressed_mean(x, Channel(codec, transport, gen), algorithm,
                                                   agreed=trial > 0)[0]
                                   for trial in range(trials)])
            out[(name, algorithm)] = (samples.double(), exact.double())
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_compressed_means_are_unbiased(world_size):
    """The averaged result is unbiased: along 32 random directions, the Monte Carlo mean of
    w.(mean - exact) is within 5 standard errors of zero."""
    trials = 300
    results = run_workers(unbiased_worker, world_size, trials)
    directions = torch.randn(700, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for key, (samples, exact) in results[0].items():
        for r in range(1, world_size):
            assert torch.equal(results[r][key][0], samples), f"{key}: ranks disagree"
        proj = (samples - exact) @ directions
        z = proj.mean(0) / (proj.std(0) / math.sqrt(trials))
        assert z.abs().max() < 5, (key, z.abs().max())
        # and the codec really compressed: single trials are noisy
        assert (samples[0] - exact).norm() > 1e-3 * exact.norm()


def wire_worker(rank, world_size):
    # the eager path: payload sizes are the wire format's, the same on both paths (see
    # test_kernels), and each process would otherwise spend most of this test compiling
    kernels.set_enabled(False)
    transport = TorchTransport()
    codec = cp.QSGD(bits=4, bucket_size=512)
    x = torch.randn(400_000)
    out = {}
    for algorithm in ("allgather", "reduce_scatter"):
        before = transport.sent_bytes
        # the collective's bytes, without the 8-byte agreement
        compressed_mean(x, Channel(codec, transport, torch.Generator().manual_seed(rank)),
                        algorithm, agreed=True)
        out[algorithm] = transport.sent_bytes - before
    return out


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_wire_bytes_per_rank(world_size):
    results = run_workers(wire_worker, world_size)
    compressed = cp.QSGD(bits=4, bucket_size=512).wire_bytes(400_000)
    w = world_size
    for r, measured in enumerate(results):
        assert measured["allgather"] == (w - 1) * compressed
        ring = 2 * (w - 1) / w * compressed
        assert abs(measured["reduce_scatter"] - ring) <= 0.10 * ring, (r, measured, ring)
        model = wire_bytes_per_rank("reduce_scatter", cp.QSGD(bits=4, bucket_size=512), 400_000, w)
        assert abs(measured["reduce_scatter"] - model) <= 0.01 * model


def overlap_worker(rank, world_size):
    """A small fp32 all-reduce started with start_mean, a pipelined compressed reduction
    issued while it is in flight (as the DDP hook does with a bucket's biases and weights)."""
    transport = TorchTransport()
    gen = torch.Generator().manual_seed(rank)
    bucket = torch.randn(3_000_000, generator=gen)
    small = [(0, 700), (1_500_000, 1_500_300)]
    expected_small, _ = compressed_mean(torch.cat([bucket[a:b] for a, b in small]),
                                        Channel(cp.Identity(), transport), "allreduce")
    big = bucket[700:1_500_000].clone()
    expected_big, _ = compressed_mean(big,
                                      Channel(CODECS["qsgd4"], transport,
                                              torch.Generator().manual_seed(7)),
                                      "allgather")
    before = transport.sent_bytes
    finish = start_mean(Segments([bucket[a:b] for a, b in small]), cp.Identity(), transport)
    started = transport.sent_bytes - before
    mean_big, _ = compressed_mean(bucket[700:1_500_000],
                                  Channel(CODECS["qsgd4"], transport,
                                          torch.Generator().manual_seed(7)),
                                  "allgather", out=bucket[700:1_500_000])
    finish()
    with pytest.raises(ValueError, match="float32"):
        start_mean(torch.zeros(4, dtype=torch.float16), cp.Identity(), transport)
    return (torch.cat([bucket[a:b] for a, b in small]), expected_small, mean_big, expected_big,
            started, bucket[1_500_300:].clone())


@pytest.mark.parametrize("world_size", [2, 3])
def test_started_mean_overlaps_a_compressed_reduction(world_size):
    results = run_workers(overlap_worker, world_size)
    for small, expected_small, big, expected_big, started, _ in results:
        assert torch.equal(small, expected_small), "the overlapped fp32 mean differs"
        assert torch.equal(big, expected_big), "the compressed mean differs when overlapped"
        assert started == 2 * (world_size - 1) * 1000 * 4 // world_size  # counted when started
    assert all(torch.equal(r[0], results[0][0]) for r in results), "ranks disagree"
    assert not torch.equal(results[0][5], results[1][5]), "values outside the parts were reduced"


def test_chunk_bounds_align_and_cover():
    for numel, block, w in [(0, 512, 3), (1, 512, 4), (1000, 128, 3), (12_345, 512, 4), (10, 1, 4)]:
        bounds = chunk_bounds(numel, block, w)
        assert len(bounds) == w and bounds[0][0] == 0 and bounds[-1][1] == numel
        for (lo, hi), (lo2, _) in zip(bounds, bounds[1:]):
            assert hi == lo2 and (lo % block == 0 or lo == numel)


def test_auto_cost_model():
    q4 = cp.QSGD(bits=4)
    assert choose_algorithm(cp.FP16(), 10 ** 7, 8) == "allreduce"
    assert choose_algorithm(q4, 10 ** 7, 2) == "allgather"
    assert choose_algorithm(q4, 10 ** 7, 4) == "reduce_scatter"
    assert choose_algorithm(q4, 1000, 8) == "allgather"  # latency-bound
    with pytest.raises(ValueError, match="summable"):
        wire_bytes_per_rank("allreduce", q4, 100, 2)


def server_feedback_worker(rank, world_size, steps):
    """Running sum of (output - exact mean of the first-stage payloads) over ``steps``."""
    transport = TorchTransport()
    codec = cp.QSGD(bits=2, bucket_size=64)
    x = torch.randn(600, generator=torch.Generator().manual_seed(rank))
    drift = {}
    for use_server in (False, True):
        gen = torch.Generator().manual_seed(rank)
        server = torch.zeros(600) if use_server else None
        total = torch.zeros(600, dtype=torch.float64)
        for _ in range(steps):
            mean, local = compressed_mean(x, Channel(codec, transport, gen), "reduce_scatter",
                                          keep_local=True, feedback=FeedbackBuffers(server=server))
            first_stage = local.clone()
            dist.all_reduce(first_stage)
            error = (mean - first_stage / world_size).double()
            drift.setdefault("one_step", error.norm().item())
            total += error
        drift[use_server] = total.norm().item()
        if use_server:
            lo, hi = chunk_bounds(600, 64, world_size)[rank]
            outside = torch.cat([server[:lo], server[hi:]])
            drift["outside"] = outside.abs().max().item() if outside.numel() else 0.0
    return drift


def test_server_error_feedback_cancels_second_quantization():
    """With the reducing rank's residual, the second quantization's errors telescope: their
    running sum stays about one quantization error, instead of growing like sqrt(steps)
    (sqrt(60) ~ 7.7 single-step errors)."""
    results = run_workers(server_feedback_worker, 3, 60)
    for drift in results:
        assert drift["outside"] == 0.0  # a rank only keeps the residual of its own chunk
        assert drift[False] > 4 * drift["one_step"], drift
        assert drift[True] < 3 * drift["one_step"], drift


def wrong_size_worker(rank, world_size, algorithm):
    """Rank 1 reduces one value fewer, past the agreement (as a front end that agreed on
    something else would): with QSGD-4 in buckets of 512 both payloads have the same byte
    size, so the engine moves them without complaint; the headers disagree."""
    x = torch.randn(1024 - rank)
    try:
        compressed_mean(x, Channel(cp.QSGD(bits=4), TorchTransport()), algorithm, agreed=True)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("algorithm", ["allgather", "reduce_scatter"])
def test_peer_with_a_wrong_sized_payload_fails_the_step(algorithm):
    for message in run_workers(wrong_size_worker, 2, algorithm):
        assert "not reducing the same tensors" in message, message


def different_lengths_worker(rank, world_size, cases):
    """Direct calls whose lengths differ by rank: each rank says what it got."""
    from commpress.comm import reduce_gradient
    from commpress.comm.agreement import ConfigurationMismatch
    messages = []
    for codec, algorithm, lengths in cases:
        x = torch.randn(lengths[rank])
        try:
            if algorithm == "pipeline":
                reduce_gradient(x, Layout([0]), Channel(codec, TorchTransport()))
            else:
                compressed_mean(x, Channel(codec, TorchTransport()), algorithm)
            messages.append("no error")
        except ConfigurationMismatch as exc:
            messages.append(str(exc))
    return messages


def test_direct_calls_with_different_lengths_raise_on_every_rank():
    """Payloads of different byte sizes went to gloo, which aborted one process (SIGABRT) in
    60 of 64 such cases while the other raised."""
    q4, nat, fp16 = cp.QSGD(bits=4), cp.NaturalCompression(), cp.FP16()
    cases = [(q4, "allgather", (1000, 5000)), (q4, "reduce_scatter", (70_000, 3)),
             (nat, "allgather", (10, 11)), (fp16, "allreduce", (4096, 4097)),
             (q4, "pipeline", (2048, 100_000)), (q4, "allgather", (0, 512))]
    for messages in run_workers(different_lengths_worker, 2, cases, timeout=120):
        for message in messages:
            assert "configured differently" in message and "numel:" in message, message
