"""Overflow on one rank must reach every rank, through every codec and collective, so that
loss scaling (AMP's GradScaler) skips the step everywhere instead of applying garbage."""
import math

import pytest
import torch

import commpress as cp
from commpress.comm import Channel, TorchTransport, compressed_mean
from distributed import run_workers

CODECS = [cp.Identity(), cp.FP16(), cp.BF16(), cp.QSGD(bits=4, bucket_size=128),
          cp.QSGD(bits=8, norm="l2"), cp.NaturalCompression(), cp.NaturalDithering()]


def collective_worker(rank, world_size):
    transport = TorchTransport()
    found = {}
    for codec in CODECS:
        algorithms = ["allreduce"] if codec.summable else ["allgather", "reduce_scatter"]
        for algorithm in algorithms:
            x = torch.randn(3000, generator=torch.Generator().manual_seed(rank))
            if rank == world_size - 1:  # only the last rank overflows
                x[17], x[2900] = math.nan, math.inf
            mean, _ = compressed_mean(x,
                                      Channel(codec, transport, torch.Generator().manual_seed(rank)),
                                      algorithm)
            found[(repr(codec), algorithm)] = (not torch.isfinite(mean[17]).item(),
                                               not torch.isfinite(mean[2900]).item(),
                                               torch.isfinite(mean[1024:2048]).all().item())
    return found


@pytest.mark.parametrize("world_size", [2, 3])
def test_non_finite_reaches_every_rank(world_size):
    for found in run_workers(collective_worker, world_size):
        for key, (nan_seen, inf_seen, rest_finite) in found.items():
            assert nan_seen and inf_seen, key
            assert rest_finite, key  # and stays where it was: other buckets are untouched


def scaler_worker(rank, world_size, spec):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    ddp = DDP(model)
    cp.register_hook(ddp, spec, log_every=0, policy="fixed")
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    skipped, scales = [], []
    for step in range(8):
        g = torch.Generator().manual_seed(100 * rank + step)
        x = torch.randn(16, 64, generator=g)
        if step == 4 and rank == 1:
            x[0, 0] = 1e38  # overflows this rank's gradients only
        loss = torch.nn.functional.mse_loss(ddp(x), x[:, :8])
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in ddp.parameters()]
        scaler.step(opt)
        scaler.update()
        skipped.append(all(torch.equal(a, b) for a, b in zip(before, ddp.parameters())))
        scales.append(scaler.get_scale())
    return skipped, scales, [p.detach().clone() for p in ddp.parameters()]


@pytest.mark.parametrize("spec", ["qsgd4", "natural", "fp16", "dithering+ef", "natural+ef21"])
def test_grad_scaler_skips_the_step_on_every_rank(spec):
    results = run_workers(scaler_worker, 2, spec)
    for skipped, scales, _ in results:
        assert skipped == [False] * 4 + [True] + [False] * 3, skipped
        assert scales[4] == scales[3] / 2       # the scaler saw the overflow and backed off
        # and training went on: error-feedback memories did not keep the overflow
    for p0, p1 in zip(results[0][2], results[1][2]):
        assert torch.equal(p0, p1) and torch.isfinite(p0).all()


def test_keep_finite_keeps_old_values_exactly_where_new_ones_are_not_finite(monkeypatch):
    """Every slice: all finite (copied), one NaN, +inf and -inf together (their sum is NaN),
    and finite values whose sum overflows (still copied, through the slow path)."""
    from commpress import finite
    monkeypatch.setattr(finite, "_FINITE_SLICE", 4)
    new = torch.tensor([1.0, 2.0, 3.0, 4.0,
                        5.0, math.nan, 7.0, 8.0,
                        math.inf, 10.0, -math.inf, 12.0,
                        3e38, 3e38, 3e38, -1.0, 0.5])
    memory = torch.full((17,), -9.0)
    finite.keep_finite(new, memory)
    expected = torch.where(torch.isfinite(new), new, torch.full((17,), -9.0))
    assert torch.equal(memory, expected)


@pytest.mark.parametrize("add", [False, True])
def test_keep_finite_compiled_pass_matches_the_eager_slices(add):
    """A vector large enough for the compiled pass: the same memory (and, with ``add``, the
    same ``new + memory`` left in ``new``) as the eager slices, NaN, +inf and -inf among them."""
    from commpress import finite
    from commpress.codecs import kernels
    n = kernels.MIN_NUMEL * 2 + 5
    gen = torch.Generator().manual_seed(3)
    new, memory = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    new[::1001], new[7::997], new[11::2003] = math.nan, math.inf, -math.inf
    results = []
    for enabled in (True, False):
        kernels.set_enabled(enabled)
        broken = dict(kernels._broken)
        a, m = new.clone(), memory.clone()
        finite.keep_finite(a, m, add)
        results.append((a, m))
    kernels.set_enabled(None)
    assert kernels._broken == broken, "the compiled pass fell back to eager"
    (fused_new, fused_memory), (eager_new, eager_memory) = results
    assert torch.equal(fused_memory, eager_memory) and torch.isfinite(fused_memory).all()
    assert torch.equal(fused_new.nan_to_num(), eager_new.nan_to_num())
    assert any(k[0] == "keep_finite" and k[2] == add for k in kernels._kernels)
