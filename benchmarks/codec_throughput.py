"""Encode/decode throughput of every codec, in fp32 input GB/s (GB = 1e9 bytes).

Usage: python benchmarks/codec_throughput.py [--quick] [--paths fused vectorised eager] [--out PATH]

For each codec, size and path (the fused, compiled kernels with, for the variable-length codecs
on the CPU, the native coder; the same with the vectorised torch coder instead; or the eager
reference): the
median over timed repeats (after one untimed first call, whose time, compilation included, is
reported) of encode and of decode, with a persistent generator as in training, next to a plain
copy of the input into a buffer (the memory-bandwidth floor: on a GPU, what the device's memory
allows). Each timed sample repeats a short call until it lasts 20 ms. Decoding writes into a buffer
allocated once, as the collectives do (``Codec.decode_into``): a fresh 100 MB output per call
would measure page faults. All run side by side in one process, so ratios
between them are meaningful even where absolute times on a shared machine are not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

import commpress as cp
from commpress.codecs import kernels, native

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/report.py
from report import out_argument  # noqa: E402

CODECS = {
    "identity": cp.Identity(), "fp16": cp.FP16(), "bf16": cp.BF16(),
    "qsgd1": cp.QSGD(bits=1, bucket_size=128), "qsgd2": cp.QSGD(bits=2, bucket_size=128),
    "qsgd4": cp.QSGD(bits=4),
    "qsgd8": cp.QSGD(bits=8), "qsgd4-l2": cp.QSGD(bits=4, norm="l2"),
    "natural": cp.NaturalCompression(), "dithering": cp.NaturalDithering(),
    "sign": cp.ScaledSign(), "signr": cp.Rotated(cp.ScaledSign()),
    "qsgd4r": cp.Rotated(cp.QSGD(bits=4)),
    # QSGD's variable-length (Elias) coding: L2 buckets with 1 and 8 levels, max-norm QSGD-2
    "elias1": cp.codec_from_name("elias1"), "elias8": cp.codec_from_name("elias8"),
    "qsgd2e": cp.codec_from_name("qsgd2e"),
}


#: each timed sample runs the call often enough to last this long: a 1M-value copy takes tens
#: of microseconds, under the clock's and the synchronization's own overhead
SAMPLE_SECONDS = 0.02


def timed(fn, repeats):
    """Seconds per call of ``fn``: the median of ``repeats`` samples, each timing as many calls
    as fill :data:`SAMPLE_SECONDS` (after one warm-up call: first-touch page faults, caches)."""
    def sample(calls):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls
    once = sample(1)
    calls = max(1, min(1000, int(SAMPLE_SECONDS / max(once, 1e-7))))
    return statistics.median(sample(calls) for _ in range(repeats))


def run(sizes, repeats, device, paths, names=None):
    rows = []
    chosen = {name: codec for name, codec in CODECS.items() if not names or name in names}
    jobs = [(name, codec, n, path) for n in sizes for path in paths for name, codec in chosen.items()
            if path != "vectorised" or codec.variable_length]
    for n in sizes:  # the physical floor: a plain copy of the same fp32 input
        x = torch.randn(n, device=device)
        out = torch.empty_like(x)
        t_copy = timed(lambda: out.copy_(x), repeats)
        rows.append({"codec": "memcpy", "path": "-", "repr": "Tensor.copy_", "numel": n,
                     "device": str(device), "wire_bytes": 4 * n, "ratio": 1.0,
                     "encode_s": t_copy, "decode_s": None, "first_call_s": None,
                     "encode_GBps": round(4 * n / 1e9 / t_copy, 3), "decode_GBps": None,
                     "roundtrip_GBps": round(4 * n / 1e9 / t_copy, 3)})
    for name, codec, n, path in tqdm(jobs, desc="codecs", disable=not sys.stderr.isatty()):
        kernels.set_enabled(path != "eager")
        native.set_enabled(False if path == "vectorised" else None)
        x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        start = time.perf_counter()  # first call: compiles the fused kernels (or loads them)
        payload = codec.encode(x, generator=gen)
        codec.decode(payload)
        first = time.perf_counter() - start
        t_enc = timed(lambda: codec.encode(x, generator=gen), repeats)
        out = torch.empty(n, device=device)
        t_dec = timed(lambda: codec.decode_into(payload, out), repeats)
        gb = 4 * n / 1e9
        rows.append({
            "codec": name, "path": path, "repr": repr(codec), "numel": n, "device": str(device),
            "wire_bytes": payload.nbytes, "ratio": round(4 * n / payload.nbytes, 3),
            "encode_s": t_enc, "decode_s": t_dec, "first_call_s": round(first, 3),
            "encode_GBps": round(gb / t_enc, 3), "decode_GBps": round(gb / t_dec, 3),
            "roundtrip_GBps": round(gb / (t_enc + t_dec), 3),
        })
    kernels.set_enabled(None)
    native.set_enabled(None)
    return rows


def markdown(rows):
    lines = ["| codec | path | elements | ratio | encode GB/s | decode GB/s | encode+decode GB/s "
             "| first call s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dec = f"{r['decode_GBps']:.2f}" if r["decode_GBps"] is not None else "-"
        first = f"{r['first_call_s']:.1f}" if r["first_call_s"] is not None else "-"
        lines.append(f"| {r['codec']} | {r['path']} | {r['numel']:,} | {r['ratio']:.2f} "
                     f"| {r['encode_GBps']:.2f} | {dec} | {r['roundtrip_GBps']:.2f} | {first} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 20, 25_000_000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paths", nargs="+", default=["fused", "vectorised", "eager"],
                        choices=["fused", "vectorised", "eager"],
                        help="fused: the compiled kernels (commpress.codecs.kernels) and, for "
                             "variable-length codecs on the CPU, the native coder "
                             "(commpress.codecs.native); vectorised: the same without the native "
                             "coder (variable-length codecs only); eager: the reference torch code")
    parser.add_argument("--codecs", nargs="+", choices=list(CODECS), help="(default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 2 repeats: checks the script runs (CI); its figures "
                             "are not measurements")
    out_argument(parser, "codec_throughput")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [1 << 16], 2
    rows = run(args.sizes, args.repeats, torch.device(args.device), args.paths, args.codecs)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "command": " ".join(["python", "benchmarks/codec_throughput.py"] + (argv or sys.argv[1:]))}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(markdown(rows))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
