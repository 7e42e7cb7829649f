"""Allreduce bandwidth over a rate-limited network, nccl-tests style, fp32 against commpress.

Usage (root, iproute2): python benchmarks/bandwidth.py [--quick] [--nodes 2 4]
    [--rates none 10gbit 1gbit 100mbit] [--ranks-per-node 1] [--methods ...]

For each node count and link rate it builds a ``commpress netsim`` network of namespaced nodes
with ``--ranks-per-node`` ranks each, and times, for every message size and method, the median
of ``--iters`` timed iterations after a warm-up, each started by a barrier:

- ``time``: seconds per allreduce; ``algbw = S / time`` with ``S`` the logical fp32 bytes
  (GB = 1e9); ``busbw = algbw * 2(W-1)/W``;
- ``wire``: bytes rank 0 handed to gloo per iteration (counted by commpress's transport, or
  from the hook's algorithm for PyTorch's hooks), and ``ratio`` = fp32 ring bytes / wire;
- ``link``: bytes that left node 0 on its simulated link per iteration, read from the
  interface's transmit counter (TCP/IP headers and acknowledgements included);
- ``ideal``: the link-limited time ``link / rate`` (full duplex: a link carries what its
  node sends), and ``of_ideal`` = ideal / time;
- ``encode``/``decode``: seconds per iteration spent in commpress codecs.

Methods: ``fp32`` (gloo all_reduce), ``torch-fp16`` and ``torch-quant`` (PyTorch's own
``fp16_compress_hook`` and ``quantization_pertensor_hook``, called on a bucket), and commpress
codecs by hook name (``qsgd4``, ``natural``, ...) with the ``auto`` collective, or with one named
after an @: ``qsgd4@hierarchical``, ``fp32@hierarchical`` (identity codec: fp32 inside the
node, all_reduce between nodes).

Results: ``--out`` (default ``benchmarks/results/local/bandwidth.json``, untracked), a
plot and a markdown table next to it; the table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py
from report import out_argument, pyplot, ratio_cell, save, split_failures  # noqa: E402

METHODS = ["fp32", "torch-fp16", "torch-quant", "fp16", "qsgd4", "qsgd8", "natural", "dithering"]
SIZES = [4 << 10, 256 << 10, 1 << 20, 4 << 20, 25_000_000, 64 << 20]


class _Bucket:
    """Just enough of DDP's GradBucket for PyTorch's stock hooks."""

    def __init__(self, buffer):
        self._buffer = buffer

    def buffer(self):
        return self._buffer


def _torch_hook_wire_bytes(method: str, numel: int, world: int) -> float:
    if method == "torch-fp16":  # ring all_reduce of fp16
        return 2 * (world - 1) / world * 2 * numel
    return (world - 1) * (numel + 8)  # all_gather of uint8 values and of (scale, zero point)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, quantization_hooks

    from commpress.comm import Channel, compressed_mean
    from commpress.comm.transport import (TorchTransport, node_layout, release_default_group,
                                          torch_hierarchical_transport)
    from commpress.names import codec_from_name, named_hooks
    from commpress.netsim import join_job, link_tx_bytes
    from commpress.stats import CommStats

    rank, per_node = join_job(args), args.ranks_per_node
    world = dist.get_world_size()
    flat = TorchTransport()
    hierarchical = (torch_hierarchical_transport(flat, node_layout(flat))
                    if any(m.endswith("@hierarchical") for m in args.methods) else None)
    torch_hooks = {"torch-fp16": default_hooks.fp16_compress_hook,
                   "torch-quant": quantization_hooks.quantization_pertensor_hook}
    gen = torch.Generator().manual_seed(rank)
    ifname = os.environ["NETSIM_IFNAME"]
    rows = []
    for size in args.sizes:
        x = torch.randn(size // 4, generator=gen)
        for method in args.methods:
            name, _, collective = method.partition("@")
            transport = hierarchical if collective == "hierarchical" else flat
            codec = codec_from_name(name) if name in named_hooks() else None
            stats, times, wire = CommStats(), [], []
            if method in torch_hooks:
                failure = _hook_failure(torch_hooks[method], x.clone())
                if failure:
                    rows.append({"method": method, "size_bytes": size, "world_size": world,
                                 "nodes": args.nnodes, "ranks_per_node": per_node,
                                 "failed": failure})
                    continue
            for i in range(args.warmup + args.iters):
                buf = x.clone()
                if i == args.warmup:  # every rank of the node is between two barriers
                    dist.barrier()
                    link_before = link_tx_bytes(ifname)
                dist.barrier()
                before = transport.sent_bytes
                start = time.perf_counter()
                if method == "fp32":
                    transport.all_reduce_sum(buf)
                    buf /= world
                elif method in torch_hooks:
                    torch_hooks[method](None, _Bucket(buf)).wait()
                else:
                    # as the front ends call it: they agree on the layout once per step
                    channel = Channel(codec, transport, gen, stats if i >= args.warmup else None)
                    compressed_mean(buf, channel, collective or _auto(codec, buf, transport),
                                    agreed=True)
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
                    wire.append(transport.sent_bytes - before)
            dist.barrier()
            link = (link_tx_bytes(ifname) - link_before) / args.iters
            rows.append({"method": method, "size_bytes": size, "world_size": world,
                         "nodes": args.nnodes, "ranks_per_node": per_node,
                         "time_s": statistics.median(times),
                         "wire_bytes": (_torch_hook_wire_bytes(method, buf.numel(), world)
                                        if method in torch_hooks else statistics.median(wire)),
                         "intra_node_bytes": stats.intra_node_bytes / args.iters,
                         "link_bytes": link,
                         "encode_s": stats.encode_seconds / args.iters,
                         "decode_s": stats.decode_seconds / args.iters})
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))
    release_default_group()


def _hook_failure(hook, buf):
    """None, or why PyTorch's ``hook`` cannot run here (every rank fails the same way:
    ``quantization_pertensor_hook`` indexes its all_gather future as NCCL fills it, and gloo's
    holds a flat list)."""
    try:
        hook(None, _Bucket(buf)).wait()
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:300]
    return None


def _auto(codec, buf, transport):
    from commpress.comm import choose_algorithm
    return choose_algorithm(codec, buf.numel(), transport.world_size, transport.local_size)


def finish(rows, rate_bits):
    failed = [r for r in rows if "failed" in r]
    rows = [r for r in rows if "failed" not in r]
    for r in rows:
        world = r["world_size"]
        s, t = r["size_bytes"], r["time_s"]
        r["algbw_GBps"] = s / t / 1e9
        r["busbw_GBps"] = r["algbw_GBps"] * 2 * (world - 1) / world
        r["ratio"] = 2 * (world - 1) / world * s / (r["wire_bytes"] - r["intra_node_bytes"])
        r["ideal_s"] = r["link_bytes"] * 8 / rate_bits if rate_bits else None
        r["of_ideal"] = r["ideal_s"] / t if rate_bits else None
    base = {r["size_bytes"]: r["time_s"] for r in rows if r["method"] == "fp32"}
    for r in rows:  # without fp32 among the methods there is nothing to compare with
        if r["size_bytes"] in base:
            r["speedup_vs_fp32"] = base[r["size_bytes"]] / r["time_s"]
    return rows + failed


def table(results) -> str:
    lines = ["| rate | nodes x ranks | method | size | time ms | algbw GB/s | busbw GB/s | wire/rank "
             "| link/node | ratio | of ideal | vs fp32 | enc+dec ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    results, failures = split_failures(results)
    for r in results:
        ideal = f"{100 * r['of_ideal']:.0f}%" if r["of_ideal"] else "-"
        lines.append(f"| {r['rate']} | {r['nodes']} x {r['ranks_per_node']} | {r['method']} "
                     f"| {r['size_bytes'] / 1e6:.3g} MB | {1e3 * r['time_s']:.1f} "
                     f"| {r['algbw_GBps']:.3f} | {r['busbw_GBps']:.3f} | {r['wire_bytes'] / 1e6:.3g} MB "
                     f"| {r['link_bytes'] / 1e6:.3g} MB | {r['ratio']:.2f} | {ideal} "
                     f"| {ratio_cell(r, 'speedup_vs_fp32')} | {1e3 * (r['encode_s'] + r['decode_s']):.1f} |")
    return "\n".join(lines + failures)


def plot(results, path: Path) -> None:
    """busbw against message size: a row of panels per node layout, a column per link rate,
    one line per method."""
    plt = pyplot()
    results, _ = split_failures(results)
    layouts = sorted({(r["nodes"], r["ranks_per_node"]) for r in results})
    rates = sorted({r["rate"] for r in results}, key=lambda rate: RATE_ORDER.get(rate, 9))
    fig, axes = plt.subplots(len(layouts), len(rates), figsize=(4.2 * len(rates), 3.4 * len(layouts)),
                             squeeze=False, sharey=True)
    for row, (nodes, per_node) in enumerate(layouts):
        for col, rate in enumerate(rates):
            ax = axes[row][col]
            rows = [r for r in results if (r["nodes"], r["ranks_per_node"], r["rate"]) == (nodes, per_node, rate)]
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["size_bytes"])
                ax.plot([r["size_bytes"] for r in mine], [r["busbw_GBps"] for r in mine], marker="o",
                        label=method)
            ax.set(xscale="log", yscale="log", xlabel="message size (bytes, fp32)",
                   title=f"{nodes} nodes x {per_node}, link {rate}")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][0].set_ylabel("busbw (GB/s of fp32 gradient)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


RATE_ORDER = {"none": 0, "10gbit": 1, "1gbit": 2, "100mbit": 3}


def main(argv=None):
    from commpress.netsim import add_job_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2])
    parser.add_argument("--rates", nargs="+", default=["none", "10gbit", "1gbit", "100mbit"])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="2 nodes, 1gbit, 1 MB, 2 iterations: a smoke test (CI), its figures "
                             "are not measurements")
    out_argument(parser, "bandwidth")
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.nodes, args.rates, args.sizes, args.iters = [2], ["1gbit"], [1 << 20], 2

    from tqdm import tqdm

    from commpress.netsim import NetSimError, check_environment, rate_bits, run_job
    try:
        check_environment()
        results = []
        for nodes in args.nodes:
            for rate in tqdm(args.rates, desc=f"{nodes} nodes", disable=not sys.stderr.isatty()):
                worker_args = ["--iters", str(args.iters), "--warmup", str(args.warmup),
                               "--sizes", *map(str, args.sizes), "--methods", *args.methods]
                rows = run_job(Path(__file__), worker_args, nodes, None if rate == "none" else rate,
                               args.ranks_per_node)
                rows = finish(rows, None if rate == "none" else rate_bits(rate))
                results += [{**r, "rate": rate} for r in rows]
    except NetSimError as exc:
        sys.exit(f"bandwidth benchmark: {exc}")
    save(args.out, "bandwidth.py", argv, results, plot, table(results))

if __name__ == "__main__":
    main()
