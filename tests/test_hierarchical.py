"""The node-aware (hierarchical) collective on real gloo groups, nodes faked with GROUP_RANK.

The byte counts on a real link, with nodes in network namespaces, are in test_multinode.py."""
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp
from commpress.comm import (Channel, HierarchicalTransport, TorchTransport, compressed_mean,
                           wire_bytes_per_rank)
from commpress.comm.transport import node_layout, torch_hierarchical_transport
from distributed import run_workers

LOCAL = 2  # ranks per fake node


def hierarchical_transport(rank, local=LOCAL):
    os.environ["GROUP_RANK"] = str(rank // local)
    flat = TorchTransport()
    return torch_hierarchical_transport(flat, node_layout(flat))


def exact_mean(x, world_size):
    exact = x.clone()
    dist.all_reduce(exact)
    return exact / world_size


def collective_worker(rank, world_size, trials):
    transport = hierarchical_transport(rank)
    out = {"layout": (transport.local_size, transport.nodes)}
    for n in (1, 7, 1000, 12_345):  # not divisible by the ranks nor by any block size
        x = torch.randn(n, generator=torch.Generator().manual_seed(100 * rank + n))
        mean, local = compressed_mean(x, Channel(cp.Identity(), transport), "hierarchical",
                                      keep_local=True)
        out[n] = ((mean - exact_mean(x, world_size)).abs().max().item(),
                  torch.allclose(local, x, rtol=1e-6, atol=1e-7), mean)
    # unbiased, and its error feedback invariant: the ranks' compressed contributions
    # average to exactly the result
    x = torch.randn(700, generator=torch.Generator().manual_seed(rank)) * (1 + rank)
    gen = torch.Generator().manual_seed(1000 + rank)
    codec = cp.QSGD(bits=4, bucket_size=128)
    samples, invariant = [], 0.0
    for _ in range(trials):
        mean, local = compressed_mean(x, Channel(codec, transport, gen), "hierarchical",
                                      keep_local=True)
        samples.append(mean)
        invariant = max(invariant, (exact_mean(local, world_size) - mean).abs().max().item())
    out["qsgd"] = (torch.stack(samples).double(), exact_mean(x, world_size).double(), invariant)
    # bytes: node-local and cross-node, against the model and against flat reduce_scatter
    big = torch.randn(400_000)
    stats = cp.CommStats()
    compressed_mean(big, Channel(cp.QSGD(bits=4), transport, gen, stats), "hierarchical")
    flat = cp.CommStats()
    compressed_mean(big, Channel(cp.QSGD(bits=4), transport.flat, gen, flat), "reduce_scatter")
    out["bytes"] = (stats.wire_bytes, stats.intra_node_bytes, flat.wire_bytes)
    return out


def test_identity_exact_qsgd_unbiased_and_bytes():
    world_size, trials = 4, 200
    results = run_workers(collective_worker, world_size, trials)
    for r, out in enumerate(results):
        assert out["layout"] == (2, 2)
        for n in (1, 7, 1000, 12_345):
            err, local_ok, mean = out[n]
            assert err <= 1e-6 and local_ok, (n, r, err)
            assert torch.equal(mean, results[0][n][2]), "ranks disagree"
    samples, exact, _ = results[0]["qsgd"]
    for out in results:
        assert torch.equal(out["qsgd"][0], samples), "ranks disagree"
        assert out["qsgd"][2] < 1e-5, out["qsgd"][2]
    directions = torch.randn(700, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    proj = (samples - exact) @ directions
    z = proj.mean(0) / (proj.std(0) / math.sqrt(trials))
    assert z.abs().max() < 5, z.abs().max()
    assert (samples[0] - exact).norm() > 1e-3 * exact.norm()  # it really compressed
    codec = cp.QSGD(bits=4)
    wire, intra, flat = results[0]["bytes"]
    assert wire == wire_bytes_per_rank("hierarchical", codec, 400_000, world_size, LOCAL)
    assert intra == 2 * 200_000 * 4 + 4  # fp32 reduce-scatter + all-gather of half, a status
    # what leaves a node: two ranks each sending their shard's payload to the other node,
    # 2(N-1)/N * B; flat reduce_scatter sends (W-L)/W of each round's payload off the node
    payload = codec.wire_bytes(400_000)
    per_node = LOCAL * (wire - intra)
    assert abs(per_node - payload) < 0.01 * payload, (per_node, payload)
    assert LOCAL * flat * (world_size - LOCAL) / (world_size - 1) > 1.9 * per_node


def unequal_worker(rank, world_size):
    os.environ["GROUP_RANK"] = str(min(rank, 1))  # nodes of 1 and 2 ranks
    flat = TorchTransport()
    try:
        torch_hierarchical_transport(flat, node_layout(flat))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_unequal_nodes_are_refused():
    for message in run_workers(unequal_worker, 3):
        assert "same number of ranks on every node" in message and "[1, 2]" in message, message


IN, HIDDEN = 256, 512  # a 128 kB QSGD-8 payload: large enough for auto to go hierarchical


def hook_worker(rank, world_size, collective):
    os.environ["GROUP_RANK"] = str(rank // LOCAL)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 8))
    reference = [p.detach().clone() for p in model.parameters()]
    state = cp.CompressionState(cp.QSGD(bits=8), collective=collective, error_feedback="ef",
                                start_iter=2, log_every=0, policy="fixed")
    wrapped = DDP(model, bucket_cap_mb=0.01)
    cp.register_hook(wrapped, state)
    mask = (torch.arange(HIDDEN * IN) % 3 != 0).reshape(HIDDEN, IN)  # an AC/DC-style mask
    grads = []
    for step in range(4):
        if step == 3:
            state.set_masks({model[0].weight: mask})
        g = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(16, IN, generator=g), torch.randn(16, 8, generator=g)
        wrapped.zero_grad()
        torch.nn.functional.mse_loss(wrapped(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        # the exact mean of this step's gradients, from an undistributed copy
        ref = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 8))
        for p, q in zip(ref.parameters(), reference):
            p.data.copy_(q)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        exact = [exact_mean(p.grad, world_size) for p in ref.parameters()]
        if step == 3:
            exact[0] *= mask
        grads[-1] = (grads[-1], exact)
    return (grads, isinstance(state.compressed_transport, HierarchicalTransport),
            state.stats.intra_node_bytes, state.feedback.state_dict())


@pytest.mark.parametrize("collective", ["hierarchical", "auto"])
def test_ddp_hook_with_feedback_and_mask(collective):
    results = run_workers(hook_worker, 4, collective)
    for grads, hierarchical, intra, memories in results:
        assert hierarchical and intra > 0  # auto chose it: 2 nodes of 2 ranks
        for step, (got, exact) in enumerate(grads):
            for g, g0, e in zip(got, results[0][0][step][0], exact):
                assert torch.equal(g, g0), "ranks disagree"
                assert (g - e).norm() <= 0.05 * e.norm(), (step, (g - e).norm() / e.norm())
        weight = grads[3][0][0]
        mask = (torch.arange(HIDDEN * IN) % 3 != 0).reshape(HIDDEN, IN)
        assert torch.all(weight[~mask] == 0) and (weight[mask] != 0).any()
        residual = memories["residual"]["0.weight"].reshape(HIDDEN, IN)
        assert torch.all(residual[~mask] == 0) and residual.abs().sum() > 0


def fp32_hook_worker(rank, world_size):
    os.environ["GROUP_RANK"] = str(rank // LOCAL)
    torch.manual_seed(0)
    model = torch.nn.Linear(IN, HIDDEN)
    reference = torch.nn.Linear(IN, HIDDEN)
    reference.load_state_dict(model.state_dict())
    wrapped = DDP(model)
    state = cp.register_hook(wrapped, "fp32", collective="hierarchical", start_iter=0, log_every=0, policy="fixed")
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(rank))
    wrapped(x).square().mean().backward()
    reference(x).square().mean().backward()
    return ([(p.grad - exact_mean(q.grad, world_size)).abs().max().item()
             for p, q in zip(model.parameters(), reference.parameters())],
            state.stats.intra_node_bytes)


def test_fp32_hook_hierarchical_is_exact():
    """The identity codec through the hierarchical collective: an exact node-aware allreduce."""
    for errors, intra in run_workers(fp32_hook_worker, 4):
        assert max(errors) < 1e-6 and intra > 0, (errors, intra)
