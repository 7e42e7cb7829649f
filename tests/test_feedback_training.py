"""Error feedback (EF, EF21, server EF) trains on every collective: a plain MLP whose layers are
large enough for each path, 200 steps, loss compared with uncompressed training."""
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp
from distributed import run_workers

STEPS = 200


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def fit_all(rank, world_size, cases):
    if world_size == 4:
        os.environ["GROUP_RANK"] = str(rank // 2)  # 2 fake nodes of 2 ranks
    return {case: fit(rank, *case) for case in cases}


def fit(rank, hook, collective, server):
    model = DDP(mlp())
    if hook != "plain":
        kwargs = {"server_feedback": True} if server else {}
        cp.register_hook(model, hook, collective=collective, min_numel=256, policy="fixed", **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    teacher = torch.randn(64, 10, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(STEPS):
        x = torch.randn(32, 64, generator=gen)
        loss = nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = torch.tensor(losses[-20:]).mean().item()
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return final, weights


CASES = [(hook, collective, server)
         for collective in ("allgather", "reduce_scatter")
         for hook, server in (("qsgd4+ef", False), ("qsgd4+ef", True), ("qsgd4+ef21", False),
                              ("natural+ef21", False))]
# QSGD-2 (omega > 1) under EF21: scaled by 1/(1+omega) it trains on allgather; under
# reduce_scatter it still ends far from fp32 (1.42 vs 0.47 here): see the README
CASES.append(("qsgd2+ef21", "allgather", False))
# rotated QSGD-4 with EF through reduce_scatter's second quantization
CASES.append(("qsgd4r+ef", "reduce_scatter", False))
# one bit per entry: the rotated scaled sign, biased, corrected by EF
CASES.append(("signr+ef", "allgather", False))
BASELINE = ("plain", "allgather", False)


def check(results, cases):
    base = results[0][BASELINE][0]
    for case in cases:
        for r in results:
            assert torch.equal(r[case][1], results[0][case][1]), f"{case}: replicas differ"
        loss = results[0][case][0]
        # EF21 with QSGD-2 scales its steps by 1/(1+omega) ~ 0.45: stable (it diverged to 4.3
        # and NaN before), but it tracks slower: 0.67-0.74 against fp32 0.47
        assert loss < base + (0.5 if case[0].startswith("qsgd2+") else 0.15), (case, loss, base)


def test_feedback_trains_on_flat_collectives():
    """Before the server memory, EF21 under reduce_scatter went 1.2 -> 16 -> ... -> NaN; before
    the 1/(1+omega) scaling, qsgd2+ef21 diverged even under allgather (4.29 vs 0.47)."""
    check(run_workers(fit_all, 3, [BASELINE] + CASES), CASES)


def test_feedback_trains_on_hierarchical_collective():
    cases = [(hook, "hierarchical", server) for hook, server in
             (("qsgd4+ef", True), ("qsgd4+ef21", False), ("natural+ef21", False))]
    check(run_workers(fit_all, 4, [BASELINE] + cases), cases)
