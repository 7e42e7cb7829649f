"""The rendezvous store of a multi-node torchrun job, in a process of its own on node 0.

When the store lives inside node 0's torchrun agent (torchrun's default), it goes away the
moment that agent exits, while the other agents may still be finishing their exit barrier or
closing the rendezvous through it: they then log a c10d trace at the end of a good run. Served
from here it outlives every agent: each node reports when its torchrun has finished, and the
store stops once all have (node 0's launcher stops it after a grace period otherwise).

    python rendezvous_store.py serve ADDR PORT NNODES   # node 0, in the background
    python rendezvous_store.py done ADDR PORT           # every node, after its torchrun

``torchrun_multinode.sh`` runs both.
"""
import sys
import time
from datetime import timedelta

import torch.distributed as dist

DONE = "commpress/launch/nodes_done"


def serve(host: str, port: int, nnodes: int) -> None:
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=30))
    while store.add(DONE, 0) < nnodes:
        time.sleep(0.2)


def done(host: str, port: int) -> None:
    try:
        dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10)).add(DONE, 1)
    except (RuntimeError, OSError) as exc:  # the store is gone already: nothing to tell it
        print(f"rendezvous_store: could not report done to {host}:{port}: "
              f"{str(exc).splitlines()[0]}", file=sys.stderr)


if __name__ == "__main__":
    action, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if action == "serve":
        serve(host, port, int(sys.argv[4]))
    elif action == "done":
        done(host, port)
    else:
        sys.exit(f"rendezvous_store.py: unknown action {action!r} (serve or done)")
