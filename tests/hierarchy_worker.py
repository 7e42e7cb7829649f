"""One rank of the hierarchical-collective check on netsim nodes, under torchrun.

Measures what leaves each node on its simulated link (the interface's transmit counter, read
by the node's first rank), for the hierarchical and the flat collective, and checks values.
Rank 0 writes a JSON report to argv[1]."""
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import commpress as cp
from commpress.comm import Channel, compressed_mean
from commpress.comm.transport import TorchTransport, node_layout, torch_hierarchical_transport
from commpress.netsim import link_tx_bytes

NUMEL, REPEATS, TRIALS = 4_000_000, 5, 100


def main(out_path):
    dist.init_process_group("gloo")
    world, local_rank = dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    flat = TorchTransport()
    transport = torch_hierarchical_transport(flat, node_layout(flat))
    ifname = os.environ["NETSIM_IFNAME"]
    report = {"world_size": world, "local_size": transport.local_size, "nodes": transport.nodes}

    x = torch.randn(12_345, generator=torch.Generator().manual_seed(dist.get_rank()))
    exact = x.clone()
    dist.all_reduce(exact)
    exact /= world
    mean, _ = compressed_mean(x, Channel(cp.Identity(), transport), "hierarchical")
    report["identity_max_error"] = (mean - exact).abs().max().item()

    codec, gen = cp.QSGD(bits=4, bucket_size=128), torch.Generator().manual_seed(dist.get_rank())
    v = torch.randn(700, generator=gen) * (1 + dist.get_rank())
    v_exact = v.clone()
    dist.all_reduce(v_exact)
    v_exact /= world
    samples = torch.stack([compressed_mean(v, Channel(codec, transport, gen), "hierarchical")[0]
                           for _ in range(TRIALS)]).double()
    directions = torch.randn(700, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    proj = (samples - v_exact.double()) @ directions
    report["qsgd_max_z"] = (proj.mean(0) / (proj.std(0) / TRIALS ** 0.5)).abs().max().item()

    big, codec = torch.randn(NUMEL, generator=gen), cp.QSGD(bits=4)
    report["payload_bytes"] = codec.wire_bytes(NUMEL)
    for name, t, algorithm in (("hierarchical", transport, "hierarchical"),
                               ("flat", flat, "reduce_scatter")):
        compressed_mean(big, Channel(codec, t, gen), algorithm)  # warm-up
        dist.barrier()
        before, times = link_tx_bytes(ifname), []
        for _ in range(REPEATS):
            dist.barrier()
            start = time.perf_counter()
            compressed_mean(big, Channel(codec, t, gen), algorithm)
            times.append(time.perf_counter() - start)
        dist.barrier()
        node_bytes = torch.tensor([(link_tx_bytes(ifname) - before) / REPEATS if local_rank == 0 else 0.0])
        dist.all_reduce(node_bytes)  # summed over the node-first ranks
        report[name] = {"node_link_bytes": node_bytes.item() / transport.nodes,
                        "seconds": statistics.median(times)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
