"""Run under horovodrun by tests/test_horovod.py; rank 0 writes JSON to argv[1]."""
import json
import sys

import horovod.torch as hvd
import torch

import commpress as cp
import commpress.horovod as cphvd

hvd.init()
rank, size = hvd.rank(), hvd.size()
out = {"size": size}

# allreduce of every codec: identity exact, compressed ones close and identical on all ranks
x = torch.randn(1000, generator=torch.Generator().manual_seed(rank))
exact = hvd.allreduce(x, op=hvd.Average)
for name, codec in {"identity": cp.Identity(), "fp16": cp.FP16(), "qsgd4": cp.QSGD(bits=4),
                    "natural": cp.NaturalCompression(), "dithering": cp.NaturalDithering()}.items():
    mean = cphvd.allreduce(x, codec, generator=torch.Generator().manual_seed(rank))
    same = len({t.numpy().tobytes() for t in hvd.allgather_object(mean)}) == 1
    out[name] = {"rel_err": ((mean - exact).norm() / exact.norm()).item(), "same": same}

# training: fp32 (Identity) vs QSGD-4 through commpress.horovod.DistributedOptimizer
true_w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
for label, codec in (("train_fp32", cp.Identity()), ("train_qsgd4", cp.QSGD(bits=4, bucket_size=128))):
    torch.manual_seed(rank)   # different inits: broadcast_parameters must align them
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = cphvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                     model.named_parameters(), codec=codec)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    losses = []
    for step in range(80):
        g = torch.Generator().manual_seed(100 * rank + step)
        xb = torch.randn(32, 64, generator=g)
        loss = torch.nn.functional.mse_loss(model(xb), xb @ true_w.t())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out[label] = {"identical": len({t.numpy().tobytes() for t in hvd.allgather_object(flat)}) == 1,
                  "first": losses[0], "last": sum(losses[-5:]) / 5,
                  "ratio": opt.comm_stats.wire_bytes and
                  (2 * (size - 1) / size * 4 * flat.numel() * 80) / opt.comm_stats.wire_bytes}
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
