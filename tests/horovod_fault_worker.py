"""Run under horovodrun by tests/test_horovod.py with COMMPRESS_TIMEOUT set: rank 1 stops
itself before its third step; rank 0's step must raise within the timeout instead of waiting
forever (see distributed.run_until_a_peer_stops)."""
import os
import sys

import horovod.torch as hvd
import torch

import commpress as cp
import commpress.horovod as cphvd
from distributed import run_until_a_peer_stops

hvd.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
opt = cphvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                 model.named_parameters(), codec=cp.QSGD(bits=4))


def step():
    opt.zero_grad()
    model(torch.randn(16, 64)).square().mean().backward()
    opt.step()


run_until_a_peer_stops(hvd.rank(), hvd.allgather_object(os.getpid()), step, sys.argv[1])
