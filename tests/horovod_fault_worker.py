"""Run under horovodrun by tests/test_horovod.py with COMMPRESS_TIMEOUT set: rank 1 stops
itself (SIGSTOP) before its third step; rank 0's step must raise within the timeout instead of
waiting forever, and it writes what it got (JSON) before killing rank 1."""
import json
import os
import signal
import sys
import time

import horovod.torch as hvd
import torch

import commpress as cp
import commpress.horovod as cphvd

hvd.init()
rank = hvd.rank()
pids = hvd.allgather_object(os.getpid())
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
opt = cphvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                 model.named_parameters(), codec=cp.QSGD(bits=4))
result = {"steps": 0}
for step in range(3):
    if rank == 1 and step == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    started = time.monotonic()
    try:
        opt.zero_grad()
        model(torch.randn(16, 64)).square().mean().backward()
        opt.step()
        result["steps"] += 1
    except Exception as exc:  # noqa: BLE001 - what the survivor got, whatever its type
        result.update(error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
        break
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
    os.kill(pids[1], signal.SIGKILL)
    os._exit(0)
