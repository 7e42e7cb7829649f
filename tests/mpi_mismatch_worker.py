"""Run under mpirun by tests/test_mpi.py: ranks passing different codecs, collectives, lengths
or dtypes to the MPI front end, and complex gradients. Every case must fail on every rank with
a named difference, never hang, abort with MPI_ERR_TRUNCATE, or return a wrong mean. Rank 0
writes JSON."""
import json
import sys

import numpy as np
import torch
from mpi4py import MPI

import commpress as cp
import commpress.mpi as cpmpi
from commpress.comm.agreement import ConfigurationMismatch

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
x = np.ones(1000, dtype=np.float32)
cases = {
    "codec": lambda: cpmpi.allreduce(comm, x, cp.QSGD(bits=4) if rank == 0 else cp.QSGD(bits=8)),
    "collective": lambda: cpmpi.allreduce(comm, x, cp.QSGD(bits=4),
                                          collective="allgather" if rank == 0 else "reduce_scatter"),
    "shape": lambda: cpmpi.allreduce(comm, x if rank == 0 else np.ones(1200, np.float32), cp.QSGD(bits=4)),
    "dtype": lambda: cpmpi.allreduce(comm, x if rank == 0 else x.astype(np.float64), cp.QSGD(bits=4)),
    "summable": lambda: cpmpi.allreduce(comm, x, cp.FP16() if rank == 0 else cp.Identity()),
}
out = {}
for name, call in cases.items():
    try:
        call()
        out[name] = "no error"
    except ConfigurationMismatch as exc:
        out[name] = str(exc)
# complex gradients were cast to float, their imaginary parts dropped: now refused, by shape
spectral = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.complex64))
spectral.grad = torch.ones_like(spectral)
try:
    cpmpi.allreduce_gradients(comm, [spectral], cp.QSGD(bits=4))
    out["complex"] = "no error"
except TypeError as exc:
    out["complex"] = str(exc)
# and the ranks are still in step: a matching call works afterwards
mean = cpmpi.allreduce(comm, x * (rank + 1), cp.Identity())
out["after"] = float(mean[0])
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
