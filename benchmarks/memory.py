"""Peak extra host memory of a DDP communication hook on one large bucket, per method.

Usage: python benchmarks/memory.py [--quick] [--numel 100000000] [--methods ...] [--out PATH]

Each method runs in 2 fresh processes (gloo, one CPU each) training a model whose only
parameter has ``--numel`` elements, so DDP makes one bucket of that size (with ``--layers K``:
K weight matrices of ``numel / K`` values, each followed by a bias, all in one bucket). The hook is wrapped:
on entry it records the process's resident memory and resets its peak (``VmHWM``, reset by
writing 5 to ``/proc/self/clear_refs``), waits for the hook's future, and records the peak
minus the entry value: what the hook added on top of the model, gradients, bucket and the
memories it keeps between steps. Reported: the largest of those over the ``--steps`` steps
after ``--warmup`` (DDP's bucket rebuild, the hook's fp32 warm-up), over both ranks, in
multiples of the bucket's fp32 bytes, with the first compressed step (which allocates the
memories) apart. Workers run with ``MALLOC_MMAP_THRESHOLD_=1048576`` so that freed buffers
leave the resident size at once. Also reported: the resident memory the hook keeps
between steps (error-feedback memories), as the growth of the entry value from the first
compressed step on (the codec's compiled kernels are loaded before training, so the
compiler's one-time footprint is in neither figure).

Methods: ``fp32`` and ``torch-fp16`` (PyTorch's ``allreduce_hook`` and
``fp16_compress_hook``) and commpress hook names, with ``@collective`` to force one
(``qsgd4+ef@reduce_scatter``), under the fixed policy (the codec's footprint on every
bucket); ``calibration:NAME`` runs NAME under the calibrated default, whose "first step" is
its calibration step (every candidate timed). Each row also gives the hook's seconds in that
first step and in the steady steps (the largest per step, over both ranks). Results: ``--out``
(default ``benchmarks/results/local/memory.json``, untracked), ``.md``, ``.png``.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py
from report import out_argument, pyplot, save  # noqa: E402

METHODS = ["fp32", "torch-fp16", "fp16", "qsgd4", "qsgd4@reduce_scatter", "qsgd4+ef",
           "qsgd4+ef@reduce_scatter", "qsgd4+ef21", "qsgd4+ef21@reduce_scatter", "qsgd8",
           "qsgd2+ef21", "natural", "natural+ef", "dithering"]
#: one of each path: PyTorch's own hook, a codec with error feedback on each collective, the
#: calibrated policy's trial steps
QUICK_METHODS = ["torch-fp16", "qsgd4+ef", "qsgd4+ef21@reduce_scatter", "calibration:qsgd4+ef21"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measured(hook, records):
    """``hook``, run to completion inside DDP's call, appending ``(entry_kb, extra_kb,
    seconds)``."""
    def wrapper(state, bucket):
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident size
        entry = _status_kb("VmRSS")
        started = time.perf_counter()
        future = hook(state, bucket)
        future.wait()
        records.append((entry, _status_kb("VmHWM") - entry, time.perf_counter() - started))
        return future
    return wrapper


def attach(method: str, model):
    """Register ``method``'s hook on ``model`` through :func:`measured`; its records."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import commpress as cp
    from commpress.codecs import kernels

    records = []
    if method in ("fp32", "torch-fp16"):
        hook = default_hooks.allreduce_hook if method == "fp32" else default_hooks.fp16_compress_hook
        model.register_comm_hook(None, measured(hook, records))
        return records, 0
    calibrated = method.startswith("calibration:")
    name, _, collective = method.removeprefix("calibration:").partition("@")
    state = cp.state_from_name(name, collective=collective or "auto", log_every=0,
                               policy="calibrated" if calibrated else "fixed")
    state.bind(model)
    model.register_comm_hook(state, measured(cp.compress_hook, records))
    # load the codec's compiled kernels now: the compiler's own one-time footprint (about
    # 100 MB) is not the hook's, and would otherwise count as kept
    probe = torch.randn(kernels.MIN_NUMEL)
    state.codec.decode(state.codec.encode(probe))
    # the calibrated policy's first compressed step is its calibration step
    return records, max(state.start_iter - 1, 1) if calibrated else state.start_iter


def worker(rank: int, args, port: int, queue) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commpress.comm.transport import release_default_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)

    class OneBucket(nn.Module):
        """``--layers`` weights of ``numel / layers`` values, each followed by a 1000-value
        bias (left uncompressed by the hook), so that the bucket interleaves them."""
        def __init__(self):
            super().__init__()
            rows = args.numel // 1000 // args.layers
            gen = torch.Generator().manual_seed(rank)
            self.weights = nn.ParameterList()
            self.biases = nn.ParameterList()
            for k in range(args.layers):
                self.weights.append(nn.Parameter(torch.zeros(rows, 1000)))
                self.register_buffer(f"noise{k}", torch.randn(rows, 1000, generator=gen))
                if args.layers > 1:
                    self.biases.append(nn.Parameter(torch.zeros(1000)))

        def forward(self, scale):
            total = sum((w * getattr(self, f"noise{k}")).sum() for k, w in enumerate(self.weights))
            return (total + sum(b.sum() for b in self.biases)) * scale

    model = DDP(OneBucket(), bucket_cap_mb=1 << 16)
    records, start_iter = attach(args.method, model)
    for _ in range(args.warmup + args.steps):
        model(torch.tensor(1.0)).backward()
        model.zero_grad(set_to_none=True)
    steady = records[max(args.warmup, start_iter + 1):]
    extra = max(kb for _, kb, _ in steady)
    kept = records[-1][0] - records[start_iter][0]
    queue.put((rank, extra, kept, records[start_iter][1], records[start_iter][2],
               max(seconds for _, _, seconds in steady)))
    del model, records
    release_default_group()


def run_method(method: str, args) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # freed buffers of 1 MiB and up go back to the OS at once, so the resident size follows
    # what is allocated (glibc's default keeps freed blocks of up to 32 MiB for reuse: tens of
    # MB that are the allocator's, not the hook's, and vary from run to run)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args.method = method
    procs = [ctx.Process(target=worker, args=(rank, args, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        return {"method": method, "failed": f"exit codes {[p.exitcode for p in procs]}"}
    got = [queue.get() for _ in procs]
    bucket_kb = args.numel * 4 / 1024
    return {"method": method, "numel": args.numel, "layers": args.layers,
            "peak_extra_x_bucket": max(g[1] for g in got) / bucket_kb,
            "kept_x_bucket": max(g[2] for g in got) / bucket_kb,
            "first_step_peak_extra_x_bucket": max(g[3] for g in got) / bucket_kb,
            "first_step_seconds": max(g[4] for g in got),
            "steady_step_seconds": max(g[5] for g in got)}


def table(results) -> str:
    lines = ["| method | peak extra during the hook, steady (x bucket) | first compressed step "
             "| kept between steps | hook s, first step | hook s, steady |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['method']} | failed: {r['failed']} | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['peak_extra_x_bucket']:.2f} "
                         f"| {r['first_step_peak_extra_x_bucket']:.2f} | {r['kept_x_bucket']:.2f} "
                         f"| {r['first_step_seconds']:.2f} | {r['steady_step_seconds']:.2f} |")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    plt = pyplot()
    ok = [r for r in results if "failed" not in r]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(ok) + 1.5))
    ax.barh([r["method"] for r in ok], [r["peak_extra_x_bucket"] for r in ok], color="tab:blue")
    ax.axvline(2.0, color="tab:red", linestyle="--", label="2x bucket")
    ax.invert_yaxis()
    ax.set(xlabel="peak extra resident memory during the hook (x bucket fp32 bytes)",
           title=f"one bucket of {ok[0]['numel'] / 1e6:.0f}M elements, 2 ranks" if ok else "")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=100_000_000,
                        help="elements of the one parameter (a multiple of 1000)")
    parser.add_argument("--layers", type=int, default=1,
                        help="split the parameter into this many weight matrices, each with a "
                             "bias after it: a bucket that interleaves compressed and "
                             "uncompressed gradients, as real models' buckets do")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help=f"4M elements in 2 layers, 2 steps, methods {' '.join(QUICK_METHODS)}: a smoke test "
                             "(CI), its figures are not measurements")
    out_argument(parser, "memory")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("memory benchmark: needs Linux's /proc/self/clear_refs to reset the peak")
    if args.quick:
        args.numel, args.methods, args.layers, args.steps = 4_000_000, QUICK_METHODS, 2, 2
    from tqdm import tqdm

    results = [run_method(m, args) for m in tqdm(args.methods, disable=not sys.stderr.isatty())]
    save(args.out, "memory.py", argv, results, plot, table(results))


if __name__ == "__main__":
    main()
