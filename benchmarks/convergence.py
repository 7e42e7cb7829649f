"""Accuracy against bytes sent: every method with the same seeds and steps, on three tasks.

Usage: python benchmarks/convergence.py [--quick] [--seeds 0 1 2] [--tasks digits libsvm lm]
       [--rate 100mbit --eval-every 20]

Each (task, seed) is one run of the main job (``commpress train``, 2 gloo workers, each codec
on every bucket: policy ``fixed``) with every method, so methods share initial weights, data
order and step count; ``powersgd1`` and ``powersgd4`` are PyTorch's own PowerSGD hook (rank 1
and 4, after 2 fp32 steps, one DDP bucket), its bytes counted as its hook sends them:

- ``digits``: the small CNN on scikit-learn's bundled digits, 15 epochs;
- ``libsvm``: logistic regression on a LIBSVM-like set (sparse binary text-like features,
  unit-norm rows, planted labels with 5% noise; see ``commpress.train``), 10 epochs;
- ``lm``: a 2-layer byte-level transformer trained with AdamW on 576 KB of the Python standard
  library's sources, held-out files for testing; one epoch (140 steps at 2 workers). Its
  accuracy is next-byte accuracy, and its test loss (nats per byte) is the finer measure.

Reported per task and method: test accuracy averaged over seeds, its spread (standard
deviation over seeds) and difference from fp32 (in points), the mean test loss and its
difference from fp32's (in percent), the AC/DC dense member (weights at the end of the last
dense phase), bytes per rank against fp32, and curves of test loss against bytes sent and
against training time (per epoch or every ``--eval-every`` steps, averaged over seeds). With
``--rate`` every rank runs on a netsim node of its own behind a link of that rate, so the
times include a real rate-limited wire; without it the ranks talk over loopback.
Results: ``--out`` (default ``benchmarks/results/local/convergence.json``, untracked) and
``.png``, ``.md`` next to it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py
from report import out_argument, pyplot, save  # noqa: E402

METHODS = ["qsgd4", "qsgd8", "natural", "dithering", "qsgd4+ef", "natural+ef", "fp16",
           "qsgd2", "qsgd2+ef", "qsgd2+ef21", "powersgd1", "powersgd4"]
TASKS = {"digits": {"epochs": 15, "lr": 0.05}, "libsvm": {"epochs": 10, "lr": 2.0},
         "lm": {"epochs": 1, "lr": 3e-3}}
BASELINE = "fp32-allreduce"
#: the issue's targets: largest allowed accuracy loss against fp32, in points
TARGETS = {"qsgd8": 0.3, "natural": 0.3, "qsgd4": 0.5, "acdc90": 1.5, "acdc90 dense": 0.5}


def run_task(task: str, seed: int, methods, epochs: int, lr: float, workers: int,
             acdc: Optional[float] = 0.9, last_dense: float = 0.10, eval_every: Optional[int] = None,
             rate: Optional[str] = None) -> dict:
    """One ``commpress train`` run of every method: ``workers`` spawned processes on loopback,
    or with ``rate`` one rank on each of ``workers`` netsim nodes linked at that rate, so
    its wall-clock times include a real rate-limited wire."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        command = [sys.executable, "-m", "commpress.cli", "train", *methods,
                   *(["--acdc", str(acdc), "--acdc-last-dense", str(last_dense)] if acdc is not None else []),
                   *(["--eval-every", str(eval_every)] if eval_every else []),
                   "--data", task, "--epochs", str(epochs), "--lr", str(lr), "--seed", str(seed),
                   "-n", str(workers), "--quiet", "--json", str(out)]
        if rate is None:
            proc = subprocess.run(command, capture_output=True, text=True)
            failed, log = proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        else:
            from commpress.netsim import NetSim
            with NetSim(nodes=workers, rate=rate) as net:  # torchrun's variables, set by hand
                line = (f"RANK=$NODE_RANK WORLD_SIZE={workers} MASTER_PORT=29613 "
                        + " ".join(shlex.quote(c) for c in command))
                nodes = net.run(line, timeout=7200)
            failed = any(node.returncode != 0 for node in nodes)
            log = "".join(f"[node {i}] {node.stdout[-2500:]}" for i, node in enumerate(nodes))
        if failed:
            sys.exit(f"convergence: {' '.join(command)} failed:\n{log}")
        return json.loads(out.read_text())


def summarize(runs) -> list:
    """One row per (task, method): accuracies over seeds and their mean, difference to fp32."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        mine = [r for r in runs if r["task"] == task]
        by_method: dict = {}
        for run in mine:
            for res in run["results"]:
                by_method.setdefault(res["method"], []).append(res)
                if "dense_member_accuracy" in res:
                    by_method.setdefault(res["method"] + " dense", []).append(
                        {"accuracy": res["dense_member_accuracy"], "wire_bytes": res["wire_bytes"],
                         "fp32_bytes": res["fp32_bytes"], "seconds": res["seconds"],
                         "test_loss": res.get("dense_member_test_loss", float("nan"))})
        base = statistics.mean(r["accuracy"] for r in by_method[BASELINE])
        for method, results in by_method.items():
            accuracy = statistics.mean(r["accuracy"] for r in results)
            accuracies = [r["accuracy"] for r in results]
            rows.append({"task": task, "method": method, "seeds": len(results),
                         "accuracies": accuracies, "accuracy": accuracy,
                         "spread": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                         "test_loss": statistics.mean(r["test_loss"] for r in results),
                         "vs_fp32_points": 100 * (accuracy - base),
                         "bytes_vs_fp32": statistics.mean(r["wire_bytes"] / r["fp32_bytes"] for r in results),
                         "seconds": statistics.mean(r["seconds"] for r in results),
                         "target_points": TARGETS.get(method)})
    return rows


def table(rows) -> str:
    lines = ["| task | method | test acc (mean of seeds) | sd | vs fp32 | test loss | loss vs fp32 "
             "| target | bytes vs fp32 | training s |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    base_loss = {r["task"]: r["test_loss"] for r in rows if r["method"] == BASELINE}
    for r in rows:
        target = r["target_points"]
        verdict = ("-" if target is None else
                   f"within {target} pp: {'met' if r['vs_fp32_points'] >= -target else 'MISSED'}")
        known = r["test_loss"] == r["test_loss"]  # not NaN (dense members of old results)
        loss = f"{r['test_loss']:.4f}" if known else "-"
        relative = f"{100 * (r['test_loss'] / base_loss[r['task']] - 1):+.2f}%" if known else "-"
        lines.append(f"| {r['task']} | {r['method']} | {100 * r['accuracy']:.2f}% "
                     f"| {100 * r['spread']:.2f} | {r['vs_fp32_points']:+.2f} pp | {loss} | {relative} | {verdict} "
                     f"| {r['bytes_vs_fp32']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(runs, path: Path) -> None:
    """Per task, test loss against MB sent per rank (left) and against training seconds
    (right: at the link rate of the run), averaged over seeds at each evaluation."""
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.5 * len(tasks)), squeeze=False)
    for (by_bytes, by_time), task in zip(axes, tasks):
        mine = [r for r in runs if r["task"] == task]
        curves: dict = {}
        for run in mine:
            for res in run["results"]:
                curves.setdefault(res["method"], []).append(res["curve"])
        colours = plt.get_cmap("tab20").colors
        for i, (method, seeds) in enumerate(curves.items()):
            points = list(zip(*seeds))  # per evaluation, one point per seed
            style = dict(color=colours[i % len(colours)], linestyle=("-", "--", ":")[i // len(colours)],
                         marker=".", label=method)
            loss = [statistics.mean(p.get("test_loss", float("nan")) for p in at) for at in points]
            megabytes = [statistics.mean(p["wire_bytes"] for p in at) / 1e6 for at in points]
            seconds = [statistics.mean(p.get("seconds", float("nan")) for p in at) for at in points]
            by_bytes.plot(megabytes, loss, **style)
            by_time.plot(seconds, loss, **style)
        link = mine[0].get("rate") or "loopback (no rate limit)"
        by_bytes.set(xscale="log", xlabel="MB sent per rank (cumulative)", ylabel="test loss",
                     title=f"{task}: test loss against bytes sent")
        by_time.set(xlabel=f"training seconds, {mine[0]['world_size']} ranks, link: {link}",
                    ylabel="test loss", title=f"{task}: test loss against wall-clock time")
        for ax in (by_bytes, by_time):
            ax.grid(True, which="both", alpha=0.3)
        by_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS,
                        help="besides fp32 and AC/DC (fp32 hook and QSGD-4; --acdc-sparsity), always run; "
                             "powersgd1 and powersgd4 are PyTorch's PowerSGD hook")
    parser.add_argument("--no-acdc", action="store_true", help="leave out the two AC/DC runs")
    parser.add_argument("--acdc-sparsity", type=float, default=0.9, metavar="SPARSITY",
                        help="AC/DC's sparsity in its sparse phases (default 0.9, the targets')")
    parser.add_argument("--acdc-last-dense", type=float, default=0.10, metavar="FRACTION",
                        help="AC/DC's dense phase before the final sparse one, as a fraction "
                             "of the run (default 0.10, the paper's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval-every", type=int, metavar="STEPS",
                        help="points on the learning curves every STEPS steps (default: per epoch)")
    parser.add_argument("--rate", metavar="RATE",
                        help="run each rank on a netsim node of its own, linked at RATE (e.g. "
                             "100mbit; needs root and iproute2), so the curves against time "
                             "include the wire (default: loopback processes)")
    parser.add_argument("--epochs", type=int, help="override every task's epochs")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, one epoch, qsgd4 only, and unless --tasks says otherwise "
                             "the two small tasks (the LM's one epoch is its full run): a smoke "
                             "test (CI), its figures are not measurements")
    out_argument(parser, "convergence")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.methods = [0], 1, ["qsgd4"]
        if args.tasks == parser.get_default("tasks"):
            args.tasks = ["digits", "libsvm"]

    from tqdm import tqdm

    if args.rate:
        from commpress.netsim import NetSimError, check_environment, rate_bits
        try:
            rate_bits(args.rate)
            check_environment()
        except (ValueError, NetSimError) as exc:
            parser.error(f"--rate: {exc}")
    jobs = [(task, seed) for task in args.tasks for seed in args.seeds]
    runs = []
    for task, seed in tqdm(jobs, desc="runs", disable=not sys.stderr.isatty()):
        settings = TASKS[task]
        run = run_task(task, seed, args.methods, args.epochs or settings["epochs"], settings["lr"],
                       args.workers, acdc=None if args.no_acdc else args.acdc_sparsity,
                       last_dense=args.acdc_last_dense,
                       eval_every=args.eval_every, rate=args.rate)
        runs.append({"task": task, "seed": seed, "rate": args.rate, **run})
    rows = summarize(runs)
    save(args.out, "convergence.py", argv, runs, plot, table(rows), summary=rows)

if __name__ == "__main__":
    main()
