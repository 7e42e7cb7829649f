"""Run under mpirun by tests/test_mpi.py: every codec through the MPI front end, and a small
training loop. Rank 0 writes the findings as JSON to the path in argv[1]."""
import copy
import json
import math
import sys

import numpy as np
import torch
from mpi4py import MPI

import commpress as cp
import commpress.mpi as cpmpi
from commpress.comm import wire_bytes_per_rank
from commpress.feedback import ErrorFeedback

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
out = {"size": size, "codecs": {}}
codecs = {"identity": cp.Identity(), "fp16": cp.FP16(), "bf16": cp.BF16(),
          "qsgd4": cp.QSGD(bits=4, bucket_size=128), "natural": cp.NaturalCompression(),
          "dithering": cp.NaturalDithering(bucket_size=128),
          "elias8": cp.EliasQSGD(levels=8, bucket_size=128)}  # payload sizes differ by rank
x = np.random.default_rng(rank).standard_normal(1000).astype(np.float32)
exact = np.zeros_like(x)
comm.Allreduce(x, exact)
exact /= size
directions = np.random.default_rng(99).standard_normal((1000, 16))
for name, codec in codecs.items():
    gen = torch.Generator().manual_seed(1000 + rank)
    entry = {}
    for collective in (["allreduce"] if codec.summable else ["allgather", "reduce_scatter"]):
        transport = cpmpi._transport(comm)
        before = transport.sent_bytes
        mean = cpmpi.allreduce(comm, x, codec, collective=collective, generator=gen)
        sent = transport.sent_bytes - before
        assert isinstance(mean, np.ndarray) and mean.dtype == np.float32 and mean.shape == x.shape
        trials = 1 if not codec.stochastic else 150
        samples = np.stack([mean] + [cpmpi.allreduce(comm, x, codec, collective=collective, generator=gen)
                                     for _ in range(trials - 1)]).astype(np.float64)
        gathered = comm.gather(samples[0].tobytes(), root=0)
        proj = (samples - exact) @ directions
        z = (np.abs(proj.mean(0)) / (proj.std(0) / math.sqrt(trials) + 1e-30)).max() if trials > 1 else 0.0
        entry[collective] = {"max_err": float(np.abs(samples[0] - exact).max()), "max_z": float(z),
                             "sent": sent, "model": wire_bytes_per_rank(collective, codec, 1000, size)
                             + (size - 1) * 8,  # the 8-byte configuration agreement
                             "same_on_all_ranks": rank != 0 or len(set(gathered)) == 1,
                             "variable_length": codec.variable_length}
    out["codecs"][name] = entry

# a tensor in, a tensor out; error feedback by name
fb = ErrorFeedback("ef")
t = torch.from_numpy(x.copy()).view(10, 100)
for _ in range(3):
    r = cpmpi.allreduce(comm, t, cp.QSGD(bits=2), error_feedback=fb, name="t",
                        generator=torch.Generator().manual_seed(rank))
out["tensor_roundtrip"] = isinstance(r, torch.Tensor) and r.shape == t.shape
out["ef_memory_named"] = sorted(fb.state_dict()["residual"]) == ["t"]

# a small training loop: linear regression, gradients averaged over MPI, fp32 vs QSGD-4
true_w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
for label, codec in (("fp32", cp.Identity()), ("qsgd4", cp.QSGD(bits=4, bucket_size=128))):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    losses = []
    for step in range(60):
        data = torch.Generator().manual_seed(100 * rank + step)
        xb = torch.randn(32, 64, generator=data)
        loss = torch.nn.functional.mse_loss(model(xb), xb @ true_w.t())
        opt.zero_grad()
        loss.backward()
        cpmpi.allreduce_gradients(comm, model.parameters(), codec, generator=gen)
        opt.step()
        losses.append(loss.item())
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().tobytes()
    out[label] = {"replicas_identical": len(set(comm.allgather(params))) == 1,
                  "first": losses[0], "last": float(np.mean(losses[-5:]))}


# GradientReducer: the engine over MPI, under its default (calibrated) policy and resumed
def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def train(reducer, model, opt, steps, first=0):
    for step in range(first, first + steps):
        xb = torch.randn(32, 64, generator=torch.Generator().manual_seed(100 * rank + step))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xb), xb @ true_w.t()).backward()
        reducer.allreduce_gradients(model.parameters())
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().tobytes()


model = net()
reducer = cpmpi.GradientReducer(comm, "qsgd4", bucket_cap_mb=0.01)  # two groups
params = train(reducer, model, torch.optim.SGD(model.parameters(), lr=0.05), 20)
plan = reducer.state_dict()["plan"]
out["reducer_default"] = {
    "plan": plan, "plan_alike": len({json.dumps(p) for p in comm.allgather(plan)}) == 1,
    "params_alike": len(set(comm.allgather(params))) == 1, "summary": reducer.stats.summary(),
    "pinned": cpmpi.GradientReducer(comm, "qsgd4", plan=plan).plan.state_dict() == plan}
resumed = {}
for spec, kwargs in (("qsgd4+ef", {"collective": "allgather"}),
                     ("qsgd4+ef", {"collective": "reduce_scatter", "server_feedback": True}),
                     ("qsgd4+ef21", {"collective": "reduce_scatter"})):
    def make():
        model = net()
        return (cpmpi.GradientReducer(comm, spec, policy="fixed", min_numel=0, **kwargs), model,
                torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    reducer, model, opt = make()
    train(reducer, model, opt, 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), reducer.state_dict()))
    straight = train(reducer, model, opt, 3, first=3)
    reducer, model, opt = make()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    reducer.load_state_dict(saved[2])
    resumed[f"{spec}/{kwargs}"] = {"bit_identical": train(reducer, model, opt, 3, first=3) == straight,
                                   "ratio": reducer.stats.ratio}
out["reducer_resumed"] = resumed

if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
