"""The CUDA path: codecs on GPU tensors, the DDP hook under NCCL (world size 1, every
collective path), and training under a non-default stream. Skipped, with the reason, where
CUDA is absent (CI has no GPU; run these on a GPU machine)."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CODECS = {"qsgd2": cp.QSGD(bits=2, bucket_size=128), "qsgd3": cp.QSGD(bits=3),
          "qsgd4": cp.QSGD(bits=4), "qsgd8": cp.QSGD(bits=8), "qsgd4-l2": cp.QSGD(bits=4, norm="l2"),
          "natural": cp.NaturalCompression(), "dithering": cp.NaturalDithering(),
          "fp16": cp.FP16(), "bf16": cp.BF16(), "identity": cp.Identity()}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_codec_on_cuda_sizes_round_trip_and_unbiased(name):
    codec = CODECS[name]
    x = torch.randn(10_001, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    payload = codec.encode(x, gen)
    assert payload.data.is_cuda and payload.nbytes == codec.wire_bytes(x.numel())
    on_gpu = codec.decode(payload)
    on_cpu = codec.decode(cp.Payload(payload.data.cpu(), payload.shape))  # one wire format
    assert torch.equal(on_gpu.cpu(), on_cpu)
    # decode with the element count known skips the header read-back and gives the same
    assert torch.equal(codec.decode(cp.Payload(payload.data), torch.float32, x.numel()).cpu(),
                       on_cpu.float())
    if codec.unbiased and codec.stochastic:
        trials = 200
        mean = sum(codec.decode(codec.encode(x, gen)).double() for _ in range(trials)) / trials
        direction = torch.randn(x.numel(), device="cuda", dtype=torch.float64)
        err = ((mean - x.double()) * direction).sum()
        single = torch.stack([((codec.decode(codec.encode(x, gen)).double() - x) * direction).sum()
                              for _ in range(30)])
        assert abs(err) < 5 * single.std() / math.sqrt(trials)


@pytest.mark.parametrize("name", ["qsgd2", "qsgd3", "qsgd4", "qsgd8", "natural", "dithering"])
def test_fused_kernels_on_cuda_one_wire_format_and_unbiased(name):
    """Large enough for the compiled (Triton) kernels: they run without falling back, their
    payloads decode bit for bit like the eager CPU decoder's, decoding into a sum matches,
    and the rounding stays unbiased."""
    from commpress.codecs import kernels
    kernels.set_enabled(True)
    try:
        codec = CODECS[name]
        n = kernels.MIN_NUMEL * 2 + 37
        x = torch.randn(n, device="cuda")
        x[5], x[6] = 0.0, 1e-40  # a zero and a subnormal (C_nat's low range)
        gen = torch.Generator(device="cuda").manual_seed(0)
        payload = codec.encode(x, gen)
        fused = codec.decode(payload)
        kernels.set_enabled(False)
        eager = codec.decode(cp.Payload(payload.data.cpu(), payload.shape))
        kernels.set_enabled(True)
        assert not [key for key in kernels._broken if "cuda" in key], kernels._broken
        assert torch.equal(fused.cpu().view(torch.int32), eager.view(torch.int32))
        total = torch.full((n,), 0.5, device="cuda")
        codec.decode_into(payload, total, alpha=0.25)
        # (the GPU may fuse the multiply-add: one rounding instead of two)
        assert torch.allclose(total.cpu(), torch.full((n,), 0.5) + eager * 0.25, rtol=1e-6, atol=0)
        # two payloads into their mean (one kernel for the bucketed codecs), as on the CPU
        gathered = torch.cat([payload.data, codec.encode(x, gen).data])
        averaged = codec.decode_mean(gathered, 2, torch.empty(n, device="cuda"))
        kernels.set_enabled(False)
        expected = codec.decode_mean(gathered.cpu(), 2, torch.empty(n))
        kernels.set_enabled(True)
        assert not [key for key in kernels._broken if "cuda" in key], kernels._broken
        assert torch.allclose(averaged.cpu(), expected, rtol=1e-6, atol=0)
        trials = 100
        mean = sum(codec.decode(codec.encode(x, gen)).double() for _ in range(trials)) / trials
        direction = torch.randn(n, device="cuda", dtype=torch.float64)
        single = torch.stack([((codec.decode(codec.encode(x, gen)).double() - x) * direction).sum()
                              for _ in range(30)])
        assert abs(((mean - x.double()) * direction).sum()) < 5 * single.std() / math.sqrt(trials)
    finally:
        kernels.set_enabled(None)


@pytest.fixture(scope="module")
def nccl_world():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'init')}",
                                rank=0, world_size=1)
        torch.cuda.set_device(0)
        yield
        dist.destroy_process_group()


@pytest.mark.parametrize("hook,collective", [
    ("fp32", "auto"), ("fp16", "auto"), ("qsgd4", "allgather"), ("qsgd4", "reduce_scatter"),
    ("natural+ef", "allgather"), ("qsgd4+ef21", "reduce_scatter"), ("dithering", "auto")])
def test_ddp_hook_under_nccl(nccl_world, hook, collective):
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 8)).cuda(),
                device_ids=[0], bucket_cap_mb=0.2)
    state = cp.register_hook(model, hook, collective=collective, start_iter=2, log_every=0)
    assert state._runtime.inline and state.transport.device == torch.device("cuda", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(5):
        opt.zero_grad()
        model(torch.randn(32, 256, device="cuda")).square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert state.stats.steps == 5
    if hook == "fp32":  # world size 1: the mean is the gradient itself
        x = torch.randn(32, 256, device="cuda")
        model.zero_grad()
        model(x).square().mean().backward()
        ddp_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model.module(x).square().mean().backward()
        assert all(torch.equal(a, p.grad) for a, p in zip(ddp_grads, model.parameters()))


def test_calibrated_policy_under_nccl_times_the_gpu(nccl_world):
    """The default policy on a GPU, where the hook only queues work: trial steps are timed
    after a synchronize, the adopted plan's reductions by CUDA events, so the drift reference
    is the GPU's time and gets set."""
    from commpress.comm.calibration import TRIAL_STEPS, WINDOW
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 8)).cuda(),
                device_ids=[0])
    state = cp.register_hook(model, "qsgd4", log_every=0)
    assert state.policy == "calibrated"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2 + 3 * TRIAL_STEPS + 2 * WINDOW):
        opt.zero_grad()
        model(torch.randn(64, 512, device="cuda")).square().mean().backward()
        opt.step()
    torch.cuda.synchronize()
    assert state.plan is not None
    assert state._drift.reference is not None and 0 < state._drift.reference < 1.0


def test_training_under_a_non_default_stream(nccl_world):
    torch.manual_seed(0)
    model = DDP(nn.Linear(1024, 1024).cuda(), device_ids=[0])
    cp.register_hook(model, "qsgd8", start_iter=0, log_every=0, min_numel=1)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.randn(64, 1024, device="cuda")
        model(x).square().mean().backward()
    torch.cuda.synchronize()
    grad = model.module.weight.grad.clone()
    model.module.zero_grad()
    model.module(x).square().mean().backward()
    exact = model.module.weight.grad
    # QSGD-8 with max-norm buckets: within one level of each bucket's scale
    assert (grad - exact).abs().max() <= exact.abs().max() / 127 * 1.01


def _gloo_on_one_gpu(rank, world_size, hook, collective, use_side_stream):
    """Two processes share cuda:0 over gloo: the hook runs on its worker thread with CUDA
    buckets (side stream + events), the path NCCL does not take."""
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4)).cuda(),
                device_ids=[0], bucket_cap_mb=0.05)
    state = cp.register_hook(model, hook, collective=collective, start_iter=1, log_every=0,
                             min_numel=1)
    assert not state._runtime.inline
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator(device="cuda").manual_seed(100 + rank)
    stream = torch.cuda.Stream() if use_side_stream else torch.cuda.current_stream()
    losses = []
    for step in range(6):
        with torch.cuda.stream(stream):
            x = torch.randn(32, 64, device="cuda", generator=gen)
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    torch.cuda.synchronize()
    # the exact fp32 mean of one step, against the hook's result, on the same weights
    x = torch.randn(32, 64, device="cuda", generator=gen)
    model.zero_grad()
    model(x).square().mean().backward()
    compressed = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.module.zero_grad()
    model.module(x).square().mean().backward()
    local = torch.cat([p.grad.flatten() for p in model.module.parameters()])
    dist.all_reduce(local)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"params": params.cpu(), "compressed": compressed.cpu(), "exact": (local / world_size).cpu(),
            "losses": losses, "steps": state.stats.steps}


@pytest.mark.parametrize("hook,collective,side", [
    ("qsgd8", "allgather", False), ("qsgd8", "reduce_scatter", True),
    ("qsgd4+ef", "reduce_scatter", False), ("natural", "allgather", True), ("fp16", "auto", False)])
def test_two_processes_share_one_gpu_over_gloo(hook, collective, side):
    from distributed import run_workers
    results = run_workers(_gloo_on_one_gpu, 2, hook, collective, side, timeout=300)
    assert torch.equal(results[0]["params"], results[1]["params"])  # replicas agree
    for r in results:
        assert r["steps"] == 7 and all(math.isfinite(v) for v in r["losses"])
        exact = r["exact"]
        err = (r["compressed"] - exact).norm() / exact.norm()
        assert err < (1.0 if "+ef" in hook else 0.1), err
