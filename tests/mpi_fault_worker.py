"""Run under mpirun by tests/test_mpi.py with COMMPRESS_TIMEOUT set: rank 1 stops itself before
the third reduction; rank 0 must raise within the timeout instead of waiting forever (see
distributed.run_until_a_peer_stops)."""
import os
import sys

import numpy as np
from mpi4py import MPI

import commpress as cp
import commpress.mpi as cpmpi
from distributed import run_until_a_peer_stops

comm = MPI.COMM_WORLD
x = np.ones(200_000, dtype=np.float32)
run_until_a_peer_stops(comm.Get_rank(), comm.allgather(os.getpid()),
                       lambda: cpmpi.allreduce(comm, x, cp.QSGD(bits=4)), sys.argv[1])
