"""A dead or hung peer fails the survivors, under every policy and on every path the hook takes
(the calibration step, the trial steps, an adopted plan of plain all-reduces, the worker
thread's compressed reductions), within the group's timeout rather than never."""
import datetime
import os
import signal
import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress as cp
from commpress.comm.calibration import Candidate, Plan, PlanEntry
from distributed import run_workers

GROUP_TIMEOUT = datetime.timedelta(seconds=8)


def faulty_peer_worker(rank, world_size, policy, fault, at_step, hook="qsgd4+ef"):
    """Rank 1 exits or stops itself at ``at_step``; the others train until their step fails
    and return where and how it failed. ``policy="pinned"``: the calibrated policy with a
    plan that sends the bucket through the codec under allgather (what it adopts on a slow
    link; on loopback it would adopt all-reduces)."""
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)))
    settings = {"policy": policy}
    if policy == "pinned":
        numel = sum(p.numel() for p in model.parameters())
        settings = {"plan": Plan(0, {numel: PlanEntry(numel, Candidate("codec", "allgather"), {})})}
    state = cp.register_hook(model, hook, log_every=0, **settings)
    for step in range(at_step + 10):
        if rank == 1 and step == at_step:
            if fault == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        started = time.monotonic()
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(100 * rank + step))
        try:
            model(x).square().mean().backward()
        except RuntimeError as exc:
            return {"step": step, "seconds": time.monotonic() - started, "error": str(exc),
                    "plan": state.stats.plan}
    return {"step": None, "plan": state.stats.plan}


@pytest.mark.parametrize("policy,fault,at_step,hook", [
    ("calibrated", "exit", 1, "qsgd4+ef"),    # the calibration step
    ("calibrated", "exit", 4, "qsgd4+ef"),    # a trial step
    ("calibrated", "exit", 30, "qsgd4+ef"),   # the adopted plan (on loopback: all-reduces)
    ("calibrated", "kill", 30, "qsgd4+ef"),
    ("calibrated", "stop", 30, "qsgd4+ef"),   # hung, not dead: only the timeout tells
    ("fixed", "exit", 4, "qsgd4+ef"),
    ("fixed", "stop", 4, "qsgd4+ef"),
    ("fixed", "stop", 4, "elias8"),  # variable-length payloads: their sizes are exchanged first
    ("calibrated", "stop", 1, "elias8"),  # the default policy timing variable-length payloads
    ("pinned", "stop", 4, "elias8"),      # ... and sending them, as on a slow link
])
def test_survivor_raises_when_a_peer_dies_or_hangs(policy, fault, at_step, hook):
    survivor = run_workers(faulty_peer_worker, 2, policy, fault, at_step, hook, timeout=120,
                           pg_timeout=GROUP_TIMEOUT, survivors=[0])[0]
    assert survivor["step"] == at_step, f"rank 0 trained on alone: {survivor}"
    assert survivor["seconds"] < GROUP_TIMEOUT.total_seconds() + 10, survivor
    if policy == "pinned":
        assert "elias8/allgather" in survivor["plan"], survivor["plan"]


def fsdp_faulty_peer_worker(rank, world_size, policy, fault, at_step, across_nodes=None):
    """As faulty_peer_worker, with the model sharded by FSDP2 and commpress.fsdp;
    ``across_nodes`` (4 ranks as 2 fake nodes of 2): ``"two_hop"`` or ``"hybrid"``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    os.environ["GROUP_RANK"] = str(rank // 2)
    mesh = (init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            if across_nodes == "hybrid" else None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    for layer in (model[0], model[2], model):
        fully_shard(layer, **({"mesh": mesh["shard"]} if mesh is not None else {}))
    cp.fsdp.compress(model, "qsgd4+ef", policy=policy, two_hop=across_nodes == "two_hop",
                     replicate_group=mesh["replicate"].get_group() if mesh is not None else None)
    for step in range(at_step + 10):
        if rank == 1 and step == at_step:
            if fault == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGSTOP)
        started = time.monotonic()
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(100 * rank + step))
        try:
            model(x).square().mean().backward()
        except RuntimeError as exc:
            return {"step": step, "seconds": time.monotonic() - started, "error": str(exc)}
    return {"step": None}


@pytest.mark.parametrize("policy,fault,at_step", [
    ("calibrated", "exit", 1), ("calibrated", "exit", 25), ("calibrated", "stop", 25),
    ("fixed", "exit", 3)])
def test_fsdp_survivor_raises_when_a_peer_dies_or_hangs(policy, fault, at_step):
    survivor = run_workers(fsdp_faulty_peer_worker, 2, policy, fault, at_step, timeout=120,
                           pg_timeout=GROUP_TIMEOUT, survivors=[0])[0]
    assert survivor["step"] == at_step, f"rank 0 trained on alone: {survivor}"
    assert survivor["seconds"] < GROUP_TIMEOUT.total_seconds() + 10, survivor


@pytest.mark.parametrize("across_nodes", ["two_hop", "hybrid"])
def test_fsdp_across_nodes_survivor_raises_when_a_peer_dies(across_nodes):
    """Under the default policy, after its plan is adopted: rank 1 (node 0) dies, rank 0 (its
    node-mate in both layouts) raises instead of training on."""
    survivor = run_workers(fsdp_faulty_peer_worker, 4, "calibrated", "exit", 25, across_nodes,
                           timeout=120, pg_timeout=GROUP_TIMEOUT, survivors=[0])[0]
    assert survivor["step"] == 25, f"rank 0 trained on alone: {survivor}"
    assert survivor["seconds"] < GROUP_TIMEOUT.total_seconds() + 10, survivor
