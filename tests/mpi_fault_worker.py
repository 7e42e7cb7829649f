"""Run under mpirun by tests/test_mpi.py with COMMPRESS_TIMEOUT set: rank 1 stops itself before
the third step of a GradientReducer under its default (calibrated) policy, a trial step; rank
0 must raise within the timeout instead of waiting forever (see
distributed.run_until_a_peer_stops)."""
import os
import sys

import torch
from mpi4py import MPI

import commpress.mpi as cpmpi
from distributed import run_until_a_peer_stops

comm = MPI.COMM_WORLD
model = torch.nn.Linear(400, 500)
reducer = cpmpi.GradientReducer(comm, "qsgd4")


def step():
    model.zero_grad()
    model(torch.randn(8, 400)).square().mean().backward()
    reducer.allreduce_gradients(model.parameters())


run_until_a_peer_stops(comm.Get_rank(), comm.allgather(os.getpid()), step, sys.argv[1])
