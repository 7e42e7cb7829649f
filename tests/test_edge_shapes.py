"""Unusual models and training loops through the hook give the same averages as plain DDP."""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp
from distributed import run_workers


class Odd(torch.nn.Module):
    """A frozen layer, an empty parameter, a branch used only on some steps, and layers
    above and below min_numel."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(32, 32)
        self.frozen.requires_grad_(False)
        self.empty = torch.nn.Parameter(torch.empty(0))
        self.big = torch.nn.Linear(32, 64)
        self.branch = torch.nn.Linear(64, 8)
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x, use_branch):
        h = torch.relu(self.big(torch.relu(self.frozen(x))))
        out = self.head(h) + self.empty.sum()
        return out + self.branch(h) if use_branch else out


def edge_worker(rank, world_size, spec):
    out = {}
    for label in ("plain", spec):
        torch.manual_seed(0)
        model = DDP(Odd(), find_unused_parameters=True, bucket_cap_mb=0.001)
        if label != "plain":
            cp.register_hook(model, label, log_every=0, policy="fixed", start_iter=0)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for step in range(6):
            opt.zero_grad()
            for micro in range(2):  # gradient accumulation: the first micro-step under no_sync
                g = torch.Generator().manual_seed(100 * rank + 10 * step + micro)
                x = torch.randn(8, 32, generator=g)
                use_branch = step % 2 == 0
                if micro == 0:
                    with model.no_sync():
                        torch.nn.functional.mse_loss(model(x, use_branch), x[:, :8]).backward()
                else:
                    torch.nn.functional.mse_loss(model(x, use_branch), x[:, :8]).backward()
            opt.step()
        out[label] = [p.detach().clone() for p in model.parameters()]
    return out


@pytest.mark.parametrize("spec,tolerance", [("fp32", 1e-6), ("qsgd8", 0.05)])
def test_frozen_empty_unused_and_no_sync(spec, tolerance):
    results = run_workers(edge_worker, 2, spec, timeout=60)
    for r in results:
        for plain, hooked in zip(r["plain"], r[spec]):
            assert plain.shape == hooked.shape
            if plain.numel():
                assert (plain - hooked).norm() <= tolerance * plain.norm(), spec
    for p0, p1 in zip(results[0][spec], results[1][spec]):
        assert torch.equal(p0, p1)


def hung_peer_worker(rank, world_size):
    import time
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)))
    cp.register_hook(model, "qsgd4", log_every=0, policy="fixed", start_iter=0)
    for step in range(3):
        if rank == 1 and step == 2:
            time.sleep(12)        # stops participating, but stays alive
            return "slept"
        started = time.monotonic()
        try:
            model(torch.randn(8, 64)).sum().backward()
        except RuntimeError as exc:
            return f"failed after {time.monotonic() - started:.1f}s: {exc}"
    return "finished"


def test_hung_peer_fails_within_the_group_timeout():
    import datetime
    results = run_workers(hung_peer_worker, 2, timeout=90, pg_timeout=datetime.timedelta(seconds=5))
    assert results[1] == "slept"
    message = results[0]
    assert message.startswith("failed after"), message
    assert float(message.split()[2].rstrip("s:")) < 11, message   # 5 s timeout, not 30 minutes
    assert "timed out" in message.lower() or "timeout" in message.lower(), message


def huge_bucket_worker(rank, world_size):
    import copy
    import torch.distributed as dist
    torch.manual_seed(0)
    model = torch.nn.Linear(8192, 8192)            # 67M weights: one 268 MB bucket
    reference = copy.deepcopy(model)
    ddp = DDP(model, bucket_cap_mb=300)
    state = cp.register_hook(ddp, "qsgd8", log_every=0, policy="fixed", start_iter=0)
    x = torch.randn(4, 8192, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().mean().backward()
    reference(x).square().mean().backward()
    exact = reference.weight.grad
    dist.all_reduce(exact)
    exact /= world_size
    rel = ((model.weight.grad - exact).norm() / exact.norm()).item()
    digest = model.weight.grad.sum().item()
    return rel, digest, state.stats.last_step.ratio, state.stats.last_step.fp32_bytes


def test_single_bucket_over_256_mb():
    results = run_workers(huge_bucket_worker, 2, timeout=300)
    (rel0, d0, ratio, dense), (rel1, d1, _, _) = results
    assert dense >= 256e6 * 2 * (2 - 1) / 2        # the bucket really was that big
    assert rel0 < 0.05 and d0 == d1                # QSGD-8 noise only, same on both ranks
    assert ratio > 3.9
