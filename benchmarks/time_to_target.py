"""Wall-clock time to a test-loss target: the transformer LM end to end, per method and link.

Usage (root, iproute2): python benchmarks/time_to_target.py [--quick] [--rates 1gbit 10gbit]
    [--nodes 2] [--seeds 0] [--methods fp32 torch-bf16 calibrated:qsgd4 ...] [--budget 150]
    [--target 2.0] [--resume]

Each run trains the byte-level transformer (``commpress.train.ByteLM``, widened and deepened:
``--width 256 --layers 4`` is 3.3M parameters, 13 MB of fp32 gradients) with AdamW on the
standard library's sources, one rank on each netsim node behind a link of ``--rate``, for
``--budget`` seconds of training (evaluation excluded). Every ``--eval-every`` steps the ranks
evaluate a fixed held-out subset together (each a share of it) and agree on the time so far
(the slowest rank's), so every rank stops at the same step. Per run: the test loss against
steps, training seconds, bytes counted by the method and bytes read off node 0's interface;
the first time the loss (averaged over 3 consecutive evaluations) is at or below
``--target``; the loss at the end of the budget.

Methods are those of ``benchmarks/ddp_step.py``: ``fp32`` (DDP's all-reduce), ``torch-bf16``
and ``torch-fp16`` (PyTorch's compression hooks, the baseline users run), ``powersgd1`` /
``powersgd4``, commpress hook names (``qsgd4``, ``qsgd4+ef``, ``signr+ef``, ...) on every
bucket, and ``calibrated:qsgd4``, the library's default policy (its calibration and trial
steps are inside the measured time, as a user pays them).

Results go to ``--out`` after every run; ``--resume`` keeps the runs already there (same
settings) and runs only the rest. A run's progress is printed by its rank 0 as it goes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py, ddp_step.py
from report import out_argument, pyplot, save  # noqa: E402

METHODS = ["fp32", "torch-bf16", "torch-fp16", "powersgd1", "powersgd4", "qsgd4", "qsgd8",
           "natural", "qsgd4+ef", "calibrated:qsgd4", "signr+ef", "qsgd2r"]
QUICK_METHODS = ["fp32", "torch-bf16", "calibrated:qsgd4"]
BASELINES = ("fp32", "torch-bf16")
#: the settings a run's results depend on: --resume keeps a run only if these match
RUN_SETTINGS = ("width", "layers", "batch_size", "lr", "lr_decay", "acdc_last_dense", "acdc_scope",
                "acdc_ramp", "corpus_bytes", "eval_every", "eval_sequences", "budget", "steps")


# -- one run, inside the netsim nodes ----------------------------------------------------------
def evaluate_together(model, x_test, y_test, rank: int, world: int):
    """Test loss and next-byte accuracy on the whole ``x_test``, each rank evaluating every
    ``world``-th sequence and the sums all-reduced: the same numbers on every rank."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(x_test[rank::world])
        target = y_test[rank::world]
        sums = torch.tensor([F.cross_entropy(logits, target, reduction="sum").item(),
                             (logits.argmax(1) == target).sum().item(), target.numel()],
                            dtype=torch.float64)
    dist.all_reduce(sums)
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def run_method(method: str, args, rank: int, world: int, ifname: str) -> dict:
    """Train ``method`` for ``args.budget`` seconds (or ``args.steps`` steps); its curve of
    evaluations, and for AC/DC its two members and the masks' overlap between phases."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import commpress as cp
    from commpress.netsim import link_tx_bytes
    from commpress.train import ByteLM, lm_corpus, powersgd_bytes_per_step
    from ddp_step import attach

    x_train, y_train, x_test, y_test = lm_corpus(args.corpus_bytes)
    x_test, y_test = x_test[:args.eval_sequences], y_test[:args.eval_sequences]
    torch.manual_seed(args.seed)
    # PowerSGD gets one bucket: with several, its callbacks deadlock gloo's worker threads
    model = DDP(ByteLM(args.width, args.layers),
                bucket_cap_mb=1024 if method.startswith("powersgd") else 25)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    decay = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
             if args.lr_decay == "cosine" else None)
    schedule = (cp.ACDCSchedule.paper(args.steps, last_dense=args.acdc_last_dense,
                                      ramp_steps=args.acdc_ramp)
                if method.startswith("acdc") else None)
    state, acdc = attach(method, model, opt, args.steps or 0, schedule=schedule,
                         scope=args.acdc_scope)
    overlaps, masks = [], {}  # AC/DC: each phase's masks against the previous phase's last
    params = sum(p.numel() for p in model.parameters())
    fp32_per_step = 2 * (world - 1) / world * 4 * params  # the ring all-reduce's bytes per rank
    per_step = {"fp32": fp32_per_step, "torch-bf16": fp32_per_step / 2,
                "torch-fp16": fp32_per_step / 2}.get(method)
    if method.startswith("powersgd"):  # after its 2 fp32 steps
        per_step = powersgd_bytes_per_step(model.module, int(method[len("powersgd"):]), world)

    def counted_bytes(steps: int) -> float:
        if state is not None:
            return state.stats.network_bytes
        if method.startswith("powersgd"):
            return fp32_per_step * min(steps, 2) + per_step * max(0, steps - 2)
        return per_step * steps

    shard = torch.arange(rank, len(y_train), world)
    steps_per_epoch = len(shard) // args.batch_size
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    curve, steps, training_s = [], 0, 0.0
    loss0, _ = evaluate_together(model.module, x_test, y_test, rank, world)
    curve.append({"steps": 0, "seconds": 0.0, "test_loss": loss0, "counted_bytes": 0.0,
                  "link_bytes": 0})
    dist.barrier()
    link_start = link_tx_bytes(ifname)
    while steps < args.steps if args.steps else training_s < args.budget:
        if steps % steps_per_epoch == 0:
            order = shard[torch.randperm(len(shard), generator=gen)]
        started = time.perf_counter()
        for _ in range(args.eval_every):
            idx = order[(steps % steps_per_epoch) * args.batch_size:][:args.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if decay is not None:
                decay.step()
            steps += 1
            if acdc is not None:
                was_dense = acdc.phase == "dense"
                acdc.step()
                if was_dense and acdc.phase == "sparse" and masks:  # a prune
                    kept = sum(int((m & masks[n]).sum()) for n, m in acdc.masks.items())
                    overlaps.append(kept / sum(int(m.sum()) for m in acdc.masks.values()))
                masks = acdc.masks or masks
            if steps % steps_per_epoch == 0 or steps == args.steps:
                break
        loss.item()
        elapsed = torch.tensor([time.perf_counter() - started])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's: one clock for all
        training_s += elapsed.item()
        test_loss, accuracy = evaluate_together(model.module, x_test, y_test, rank, world)
        curve.append({"steps": steps, "seconds": training_s, "test_loss": test_loss,
                      "accuracy": accuracy, "counted_bytes": counted_bytes(steps),
                      "link_bytes": link_tx_bytes(ifname) - link_start})
        if rank == 0:
            print(f"{method} seed {args.seed}: step {steps}, {training_s:.0f} s, "
                  f"test loss {test_loss:.4f}", flush=True)
    row = {"method": method, "seed": args.seed, "params": params, "curve": curve,
           "step_s": training_s / steps, "plan": state.stats.plan if state is not None else ""}
    if acdc is not None:  # the run ends sparse: the dense member is the last dense phase's end
        dense = ByteLM(args.width, args.layers)
        dense.load_state_dict(acdc.sparse_dense_pair()[1])
        loss, accuracy = evaluate_together(dense, x_test, y_test, rank, world)
        row.update(dense_member_loss=loss, dense_member_accuracy=accuracy,
                   density=acdc.density, mask_overlaps=overlaps, schedule=schedule.sparse,
                   sparse_phase_bytes_per_step=state.phase_stats["sparse"].per_step()["network_bytes"],
                   dense_phase_bytes_per_step=state.phase_stats["dense"].per_step()["network_bytes"])
    return row


def worker(args) -> None:
    import os

    from commpress.comm.transport import release_default_group
    from commpress.netsim import join_job

    rank = join_job(args)
    row = run_method(args.methods[0], args, rank, args.nnodes * args.ranks_per_node,
                     os.environ["NETSIM_IFNAME"])
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps([row]))
    release_default_group()


# -- the driver ---------------------------------------------------------------------------------
def settings_of(args) -> dict:
    return {name: getattr(args, name) for name in RUN_SETTINGS}


def run_key(run: dict) -> tuple:
    return run["rate"], run["nodes"], run["seed"], run["method"]


#: evaluations averaged when reading the target off a curve: one evaluation's test loss moves
#: by about 0.02 nats between neighbours on the held-out subset
SMOOTHING = 3


def reached(run: dict, target: float) -> Optional[dict]:
    """The first evaluation of ``run`` at which the mean test loss of it and the
    ``SMOOTHING - 1`` before it is at or below ``target``, or None."""
    losses = [p["test_loss"] for p in run["curve"]]
    for i, point in enumerate(run["curve"]):
        window = losses[max(0, i - SMOOTHING + 1):i + 1]
        if sum(window) / len(window) <= target:
            return point
    return None


def summarize(runs, target: float, budget: float) -> list:
    """Per (rate, nodes, method): the mean over seeds of the time to the target and of the loss
    at the budget (the last evaluation within it), and the time to target against fp32's and
    bf16's (ratios of the means); None where a method did not reach the target in every seed."""
    rows = []
    for rate, nodes in dict.fromkeys((r["rate"], r["nodes"]) for r in runs):
        mine = [r for r in runs if r["rate"] == rate and r["nodes"] == nodes]
        by_method: dict = {}
        for run in mine:
            by_method.setdefault(run["method"], []).append(run)
        at_target = {method: [reached(s, target) for s in seeds] for method, seeds in by_method.items()}
        means = {method: ({key: statistics.mean(p[key] for p in points)
                           for key in ("seconds", "steps", "link_bytes")}
                          if all(points) else None) for method, points in at_target.items()}
        for method, seeds in by_method.items():
            mean = means[method] or {}
            row = {"rate": rate, "nodes": nodes, "method": method, "seeds": len(seeds),
                   "target_seconds": mean.get("seconds"), "target_steps": mean.get("steps"),
                   "target_link_mb": mean["link_bytes"] / 1e6 if mean else None,
                   "loss_at_budget": statistics.mean(
                       [p for p in s["curve"] if p["seconds"] <= budget][-1]["test_loss"] for s in seeds),
                   "step_s": statistics.mean(s["step_s"] for s in seeds),
                   "plan": seeds[0]["plan"]}
            for base in BASELINES:
                if means.get(base) and means[method] and means[method]["seconds"] > 0:
                    row[f"sooner_than_{base}"] = means[base]["seconds"] / means[method]["seconds"]
            rows.append(row)
    return rows


def table(rows, target: float, budget: str) -> str:
    def cell(value, spec, suffix=""):
        return "-" if value is None else f"{value:{spec}}{suffix}"
    lines = [f"Target: test loss {target} nats/byte (the mean of {SMOOTHING} consecutive "
             f"evaluations); budget {budget} of training per run.", "",
             "| link | nodes | method | seeds | time to target s | steps | link MB to target "
             "| sooner than fp32 | sooner than bf16 hook | loss at budget | step ms |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rate']} | {r['nodes']} | {r['method']} | {r['seeds']} "
                     f"| {cell(r['target_seconds'], '.1f')} | {cell(r['target_steps'], '.0f')} "
                     f"| {cell(r['target_link_mb'], '.0f')} "
                     f"| {cell(r.get('sooner_than_fp32'), '.2f', 'x')} "
                     f"| {cell(r.get('sooner_than_torch-bf16'), '.2f', 'x')} "
                     f"| {r['loss_at_budget']:.4f} | {1e3 * r['step_s']:.0f} |")
    plans = {(r["rate"], r["nodes"]): r["plan"] for r in rows if r["method"].startswith("calibrated")}
    lines += [""] + (["-: the target was not reached within the budget (in some seed)."]
                     if any(r["target_seconds"] is None for r in rows) else [])
    lines += [f"calibrated default at {rate}, {nodes} nodes: {plan}" for (rate, nodes), plan in plans.items()]
    return "\n".join(lines)


def acdc_table(runs) -> str:
    """AC/DC's two members against fp32's final model, per (link, nodes, seed)."""
    lines = ["| link | nodes | seed | method | sparse member loss | acc vs fp32 | dense member loss "
             "| acc vs fp32 | density | mask overlap between prunes | sparse/dense bytes per step |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    final = {(r["rate"], r["nodes"], r["seed"]): r["curve"][-1] for r in runs if r["method"] == "fp32"}
    for r in runs:
        if "dense_member_loss" not in r:
            continue
        base = final.get((r["rate"], r["nodes"], r["seed"]))
        sparse = r["curve"][-1]
        versus = (lambda acc: f"{100 * (acc - base['accuracy']):+.2f} pp") if base else (lambda acc: "-")
        overlaps = " ".join(f"{o:.3f}" for o in r["mask_overlaps"]) or "-"
        lines.append(f"| {r['rate']} | {r['nodes']} | {r['seed']} | {r['method']} "
                     f"| {sparse['test_loss']:.4f} | {versus(sparse['accuracy'])} "
                     f"| {r['dense_member_loss']:.4f} | {versus(r['dense_member_accuracy'])} "
                     f"| {r['density']:.3f} | {overlaps} "
                     f"| {r['sparse_phase_bytes_per_step'] / r['dense_phase_bytes_per_step']:.3f} |")
    return "\n".join(lines)


def plot(runs, path: Path, target: float) -> None:
    """Test loss against training seconds, one panel per (link, nodes), seeds averaged per
    evaluation."""
    plt = pyplot()
    panels = list(dict.fromkeys((r["rate"], r["nodes"]) for r in runs))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, (rate, nodes) in zip(axes[0], panels):
        curves: dict = {}
        for run in runs:
            if (run["rate"], run["nodes"]) == (rate, nodes):
                curves.setdefault(run["method"], []).append(run["curve"])
        for i, (method, seeds) in enumerate(curves.items()):
            points = list(zip(*seeds))  # the evaluations all seeds have
            ax.plot([statistics.mean(p["seconds"] for p in at) for at in points],
                    [statistics.mean(p["test_loss"] for p in at) for at in points],
                    color=colours[i % len(colours)], label=method)
        ax.axhline(target, color="grey", linestyle=":", label="target")
        ax.set(xlabel="training seconds", ylabel="test loss (nats/byte)", ylim=(target - 0.4, target + 1.2),
               title=f"{nodes} nodes, {rate} links")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    from commpress.netsim import add_job_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_job_arguments(parser)
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # a worker's
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank (default 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's (default 0.001)")
    parser.add_argument("--lr-decay", choices=["none", "cosine"], default="none",
                        help="cosine: the learning rate decays to 0 over --steps (needs --steps)")
    parser.add_argument("--acdc-last-dense", type=float, default=0.10, metavar="FRACTION",
                        help="AC/DC: the dense phase before the final sparse one lasts at least "
                             "this fraction of the run (default 0.10, the paper's)")
    parser.add_argument("--acdc-scope", choices=["global", "layerwise"], default="global",
                        help="AC/DC: masks by magnitude over all layers at once (default), or "
                             "the same sparsity in every layer")
    parser.add_argument("--acdc-ramp", type=int, default=0, metavar="STEPS",
                        help="AC/DC: raise the sparsity over the first sparse phase's first STEPS "
                             "steps (ACDCSchedule's ramp_steps; default 0: prune at once)")
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000,
                        help="bytes of the standard library's sources (default 4 MB; 10%% held out)")
    parser.add_argument("--eval-every", type=int, default=20, metavar="STEPS")
    parser.add_argument("--eval-sequences", type=int, default=384,
                        help="held-out sequences of 64 bytes evaluated (default 384)")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per run")
    parser.add_argument("--steps", type=int, default=0,
                        help="train this many steps per run instead of --budget seconds; AC/DC "
                             "methods (acdc90, acdc95:qsgd4, ...) need it: their schedule, the "
                             "paper's, is laid over these steps")
    parser.add_argument("--target", type=float, default=2.0,
                        help="test loss, nats per byte (read off the curves: changing it needs no rerun)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out made with the same settings")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test (CI): a small model, 3 methods, 4 s each; not a measurement")
    out_argument(parser, "time_to_target")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if any(m.startswith("acdc") for m in args.methods) and not args.steps:
        parser.error("AC/DC methods need --steps: the paper's schedule is laid over a known length")
    if args.lr_decay != "none" and not args.steps:
        parser.error("--lr-decay needs --steps: the decay is laid over a known length")
    if args.steps < 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    if args.quick:
        args.methods, args.rates, args.width, args.layers = QUICK_METHODS, ["1gbit"], 64, 1
        args.budget, args.corpus_bytes, args.eval_every, args.target = 4.0, 400_000, 10, 3.5
        args.eval_sequences = 128

    from tqdm import tqdm

    from commpress.netsim import NetSimError, check_environment, run_job
    try:
        check_environment()
    except NetSimError as exc:
        parser.error(str(exc))
    done = []
    if args.resume and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        if previous.get("settings") == settings_of(args):
            done = previous["results"]
        else:
            print(f"--resume: {args.out} was made with other settings; starting again")
    jobs = [(rate, nodes, seed, method) for rate in args.rates for nodes in args.nodes
            for seed in args.seeds for method in args.methods]
    runs = [r for r in done if run_key(r) in jobs]
    todo = [job for job in jobs if job not in {run_key(r) for r in runs}]

    budget = float("inf") if args.steps else args.budget

    def write():
        rows = summarize(runs, args.target, budget)
        text = table(rows, args.target, f"{args.steps} steps" if args.steps else f"{args.budget:g} s")
        if any("dense_member_loss" in r for r in runs):
            text += "\n\n" + acdc_table(runs)
        save(args.out, "time_to_target.py", argv, runs,
             lambda results, path: plot(results, path, args.target),
             text, summary=rows, settings=settings_of(args))
    for rate, nodes, seed, method in tqdm(todo, desc="runs", disable=not sys.stderr.isatty()):
        worker_args = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in RUN_SETTINGS]
        row = run_job(Path(__file__), [*worker_args, "--seed", str(seed), "--methods", method],
                      nodes, rate, timeout=args.budget * 4 + 600, echo=True)[0]
        runs.append({"rate": rate, "nodes": nodes, **row})
        write()  # after every run: --resume goes on from here
    if not todo and runs:  # every run already there: the summary at this --target
        write()


if __name__ == "__main__":
    main()
