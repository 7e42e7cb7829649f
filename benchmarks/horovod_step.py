"""Training step time with Horovod's DistributedOptimizer against commpress's, at a known rate.

Usage (root, iproute2, Horovod built with launch/install_horovod.sh):
    python benchmarks/horovod_step.py [--quick] [--rates 1gbit] [--methods ...]

Two ranks under ``horovodrun --gloo -H localhost:2`` inside a network namespace whose loopback
is shaped with ``tc tbf`` at the rate (MTU 1500): both ranks' traffic crosses that one link,
as for two GPUs behind one shared link. (netsim's one-node-per-namespace layout needs
horovodrun to start remote ranks over ssh, which these machines do not have.) The model, batch
and optimizer are ``ddp_step.py``'s (three ``width x width`` Linear layers, batch 32, SGD with
momentum). Per method: the median of ``--steps`` timed steps after ``--warmup``, each
started by ``hvd.barrier()``, and the bytes the namespace's loopback carried per step and
rank. Methods:

- ``hvd-fp32``, ``hvd-fp16``: ``hvd.DistributedOptimizer`` with ``hvd.Compression.none`` /
  ``.fp16``: Horovod's own, overlapping backward;
- ``cphvd-NAME`` (``cphvd-qsgd4``, ``cphvd-fp16``, ``cphvd-natural+ef``, ...):
  ``commpress.horovod.DistributedOptimizer`` with that hook name's codec on every group
  (``policy="fixed"``), which overlaps backward too; ``cphvd-NAME-1group``: the same in one
  group, reduced after backward (no overlap);
- ``cphvd-calibrated``: the optimizer's default, the calibrated policy with QSGD-4 as its
  codec: per group Horovod's fp32 or fp16 all-reduce or QSGD-4, as measured (its warm-up
  must cover the calibration and trial steps: at least 20 steps; the plan is in the row).

Results: ``--out`` (default ``benchmarks/results/local/horovod_step.json``) and ``.png``,
``.md`` next to it; the table is printed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py, ddp_step.py
from ddp_step import add_step_arguments, make_model  # noqa: E402
from report import out_argument, ratio_cell, save, step_time_plot  # noqa: E402

METHODS = ["hvd-fp32", "hvd-fp16", "cphvd-fp16", "cphvd-qsgd4", "cphvd-qsgd4-1group",
           "cphvd-qsgd8", "cphvd-natural", "cphvd-calibrated"]
QUICK_METHODS = ["hvd-fp32", "hvd-fp16", "cphvd-qsgd4", "cphvd-calibrated"]
#: warm-up steps of the calibrated method: step 1 calibrates, then up to 3 plans x 5 trials
CALIBRATED_WARMUP = 20


def optimizer_for(method: str, model):
    import horovod.torch as hvd
    import torch

    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if method in ("hvd-fp32", "hvd-fp16"):
        compression = hvd.Compression.fp16 if method == "hvd-fp16" else hvd.Compression.none
        return hvd.DistributedOptimizer(base, model.named_parameters(), compression=compression)
    import commpress.horovod as cphvd

    name = method[len("cphvd-"):]
    if name == "calibrated":
        return cphvd.DistributedOptimizer(base, model.named_parameters(), codec="qsgd4")
    one_group = name.endswith("-1group")
    return cphvd.DistributedOptimizer(base, model.named_parameters(), policy="fixed",
                                      codec=name[:-len("-1group")] if one_group else name,
                                      num_groups=1 if one_group else 0)


def loopback_bytes() -> int:
    from commpress.netsim import link_tx_bytes
    return link_tx_bytes("lo")


def run_method(method: str, args) -> dict:
    import horovod.torch as hvd
    import torch

    torch.manual_seed(0)
    model = make_model(args.width)
    opt = optimizer_for(method, model)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    gen = torch.Generator().manual_seed(hvd.rank())
    times = []
    warmup = max(args.warmup, CALIBRATED_WARMUP) if method == "cphvd-calibrated" else args.warmup
    for step in range(warmup + args.steps):
        x = torch.randn(32, args.width, generator=gen)
        y = torch.randint(0, 10, (32,), generator=gen)
        if step == warmup:
            hvd.barrier()
            before = loopback_bytes()
        hvd.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    hvd.barrier()
    row = {"method": method, "step_s": statistics.median(times),
           # the loopback carries both ranks' traffic (and the barriers')
           "link_bytes_per_step": (loopback_bytes() - before) / args.steps / hvd.size(),
           "final_loss": loss.item()}
    stats = getattr(opt, "comm_stats", None)
    if stats is not None:
        row.update(encode_s=stats.last_step.encode_seconds, decode_s=stats.last_step.decode_seconds)
        if stats.plan:
            row["plan"] = stats.plan
    return row


def worker(args) -> None:
    import horovod.torch as hvd
    import torch

    hvd.init()
    torch.set_num_threads(1)  # two ranks on this machine's cores
    rows = [run_method(m, args) for m in args.methods]
    if hvd.rank() == 0:
        Path(args.worker_out).write_text(json.dumps(rows))


def run_rate(args, rate: str) -> list:
    """Every method at ``rate`` in one horovodrun job, inside a namespace with a shaped
    loopback."""
    import tempfile

    from commpress.netsim import NetSim, NetSimError, _sh, tbf_args

    with tempfile.TemporaryDirectory() as tmp, NetSim(nodes=1, rate=None) as net:
        ns, out = net.node_ns(0), Path(tmp) / "rows.json"
        _sh("ip", "link", "set", "lo", "mtu", "1500", ns=ns)
        _sh("tc", "qdisc", "add", "dev", "lo", "root", "tbf", *tbf_args(rate), ns=ns)
        command = " ".join([
            "horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
            str(Path(__file__).resolve()), "--worker", "--worker-out", str(out),
            "--width", str(args.width), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--methods", *args.methods])
        result = net.run(command, timeout=3600)[0]
        if result.returncode != 0:
            raise NetSimError(f"horovodrun failed:\n{result.stdout[-3000:]}")
        return [{**r, "rate": rate} for r in json.loads(out.read_text())]


def table(results) -> str:
    lines = ["| rate | method | step ms | vs hvd-fp32 | vs hvd-fp16 | link MB/step/rank | enc+dec ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        codec = f"{1e3 * (r['encode_s'] + r['decode_s']):.1f}" if "encode_s" in r else "-"
        lines.append(f"| {r['rate']} | {r['method']} | {1e3 * r['step_s']:.1f} "
                     f"| {ratio_cell(r, 'vs_hvd_fp32')} | {ratio_cell(r, 'vs_hvd_fp16')} "
                     f"| {r['link_bytes_per_step'] / 1e6:.3g} | {codec} |")
    lines += [f"\n{r['method']} at {r['rate']}: {r['plan']}" for r in results if r.get("plan")]
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    step_time_plot(results, path, lambda r: r["rate"],
                   lambda rate: f"2 Horovod ranks, shared link {rate}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="+", default=["1gbit"])
    add_step_arguments(parser, METHODS, QUICK_METHODS, "width 256, 2 timed steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    out_argument(parser, "horovod_step")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.width, args.steps, args.methods = 256, 2, QUICK_METHODS
    import shutil

    from commpress.netsim import NetSimError, check_environment
    if shutil.which("horovodrun") is None:
        sys.exit("horovod_step benchmark: horovodrun not found (bash launch/install_horovod.sh)")
    try:
        check_environment()
        results = []
        for rate in args.rates:
            rows = run_rate(args, rate)
            base = {r["method"]: r["step_s"] for r in rows}
            for r in rows:
                for baseline, key in (("hvd-fp32", "vs_hvd_fp32"), ("hvd-fp16", "vs_hvd_fp16")):
                    if baseline in base:  # where it ran
                        r[key] = base[baseline] / r["step_s"]
            results += rows
    except NetSimError as exc:
        sys.exit(f"horovod_step benchmark: {exc}")
    save(args.out, "horovod_step.py", argv, results, plot, table(results))


if __name__ == "__main__":
    main()
