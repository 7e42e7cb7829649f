"""Run under mpirun by tests/test_mpi.py with COMMPRESS_TIMEOUT set: rank 1 stops itself
(SIGSTOP, alive but silent) before the third reduction; rank 0 must raise within the
timeout instead of waiting forever, and writes what it got (JSON) before killing rank 1."""
import json
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

import commpress as cp
import commpress.mpi as cpmpi

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
peer = comm.allgather(os.getpid())
x = np.ones(200_000, dtype=np.float32)
result = {"steps": 0}
for step in range(3):
    if rank == 1 and step == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    started = time.monotonic()
    try:
        cpmpi.allreduce(comm, x, cp.QSGD(bits=4), generator=None)
        result["steps"] += 1
    except TimeoutError as exc:
        result.update(error=str(exc), seconds=time.monotonic() - started)
        break
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
    os.kill(peer[1], signal.SIGKILL)  # the stopped peer; the job then ends
    os._exit(0)
