"""Allreduce bandwidth over a rate-limited network, nccl-tests style, fp32 against commpress.

Usage (root, iproute2): python benchmarks/bandwidth.py [--quick] [--nodes 2] [--rates 1gbit 100mbit]

For each link rate it builds a ``commpress netsim`` network of ``--nodes`` namespaced nodes (one
rank each), and times, for every message size and method, the median of ``--iters`` timed
iterations after a warm-up, each started by a barrier:

- ``time``: seconds per allreduce; ``algbw = S / time`` with ``S`` the logical fp32 bytes
  (GB = 1e9); ``busbw = algbw * 2(W-1)/W``;
- ``wire``: bytes this rank handed to gloo per iteration (measured), and ``ratio`` = fp32
  ring bytes / wire;
- ``ideal``: the link-limited time ``wire / rate`` (each rank's link carries what it sends,
  full duplex), and ``of_ideal`` = ideal / time;
- ``encode``/``decode``: seconds per iteration spent in the codec.

Results: ``benchmarks/results/bandwidth.json``; a table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["fp32", "fp16", "qsgd4", "qsgd8", "natural", "dithering"]
SIZES = [4 << 10, 256 << 10, 1 << 20, 4 << 20, 25_000_000, 64 << 20]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import commpress as cp
    from commpress.comm import TorchTransport, choose_algorithm, compressed_mean
    from commpress.stats import CommStats

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nnodes))
    rank, world = int(os.environ["NODE_RANK"]), int(os.environ["NNODES"])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{args.port}",
                            rank=rank, world_size=world)
    transport = TorchTransport()
    codecs = {"fp16": cp.FP16(), "qsgd4": cp.QSGD(bits=4), "qsgd8": cp.QSGD(bits=8),
              "natural": cp.NaturalCompression(), "dithering": cp.NaturalDithering()}
    gen = torch.Generator().manual_seed(rank)
    rows = []
    for size in args.sizes:
        x = torch.randn(size // 4, generator=gen)
        for method in args.methods:
            stats, times, wire = CommStats(), [], []
            for i in range(args.warmup + args.iters):
                buf = x.clone()
                dist.barrier()
                before = transport.sent_bytes
                start = time.perf_counter()
                if method == "fp32":
                    transport.all_reduce_sum(buf)
                    buf /= world
                else:
                    codec = codecs[method]
                    compressed_mean(buf, codec, transport,
                                    choose_algorithm(codec, buf.numel(), world), gen,
                                    stats if i >= args.warmup else None)
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
                    wire.append(transport.sent_bytes - before)
            t = statistics.median(times)
            rows.append({"method": method, "size_bytes": size, "world_size": world,
                         "time_s": t, "wire_bytes": statistics.median(wire),
                         "encode_s": stats.encode_seconds / args.iters,
                         "decode_s": stats.decode_seconds / args.iters})
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def finish(rows, rate_bits, world):
    for r in rows:
        s, t = r["size_bytes"], r["time_s"]
        r["algbw_GBps"] = s / t / 1e9
        r["busbw_GBps"] = r["algbw_GBps"] * 2 * (world - 1) / world
        r["ratio"] = 2 * (world - 1) / world * s / r["wire_bytes"]
        r["ideal_s"] = r["wire_bytes"] * 8 / rate_bits if rate_bits else None
        r["of_ideal"] = r["ideal_s"] / t if rate_bits else None
    base = {r["size_bytes"]: r["time_s"] for r in rows if r["method"] == "fp32"}
    for r in rows:
        r["speedup_vs_fp32"] = base[r["size_bytes"]] / r["time_s"]
    return rows


def table(results) -> str:
    lines = ["| rate | W | method | size | time ms | algbw GB/s | busbw GB/s | wire/rank | ratio "
             "| of ideal | vs fp32 | enc+dec ms |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ideal = f"{100 * r['of_ideal']:.0f}%" if r["of_ideal"] else "-"
        lines.append(f"| {r['rate']} | {r['world_size']} | {r['method']} | {r['size_bytes'] / 1e6:.3g} MB "
                     f"| {1e3 * r['time_s']:.1f} | {r['algbw_GBps']:.3f} | {r['busbw_GBps']:.3f} "
                     f"| {r['wire_bytes'] / 1e6:.3g} MB | {r['ratio']:.2f} | {ideal} "
                     f"| {r['speedup_vs_fp32']:.2f}x | {1e3 * (r['encode_s'] + r['decode_s']):.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2])
    parser.add_argument("--rates", nargs="+", default=["none", "10gbit", "1gbit", "100mbit"])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 nodes, 1gbit, 1 MB, 2 iterations (CI)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bandwidth.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--nnodes", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=29611, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.nodes, args.rates, args.sizes, args.iters = [2], ["1gbit"], [1 << 20], 2

    from tqdm import tqdm

    from commpress.netsim import NetSim, NetSimError, check_environment, rate_bits
    try:
        check_environment()
    except NetSimError as exc:
        sys.exit(f"bandwidth benchmark: {exc}")
    results = []
    for nodes in args.nodes:
        for rate in tqdm(args.rates, desc=f"{nodes} nodes", disable=not sys.stderr.isatty()):
            with tempfile.TemporaryDirectory() as tmp, \
                    NetSim(nodes=nodes, rate=None if rate == "none" else rate) as net:
                out = Path(tmp) / "rows.json"
                command = (f"{sys.executable} {Path(__file__).resolve()} --worker --nnodes {nodes} "
                           f"--worker-out {out} --iters {args.iters} --warmup {args.warmup} "
                           f"--sizes {' '.join(map(str, args.sizes))} --methods {' '.join(args.methods)}")
                runs = net.run(command, timeout=3600)
                failed = [(i, r.stdout[-2000:]) for i, r in enumerate(runs) if r.returncode != 0]
                if failed:
                    sys.exit(f"bandwidth benchmark: nodes failed: {failed}")
                rows = finish(json.loads(out.read_text()), None if rate == "none" else rate_bits(rate), nodes)
                results += [{**r, "rate": rate} for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"command": " ".join(["python", "benchmarks/bandwidth.py"] + (argv or sys.argv[1:])),
            "cpu_count": os.cpu_count()}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table(results))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
