"""The byte-level transformer trained under FSDP: test loss after a fixed budget, per method.

Usage: python benchmarks/fsdp_convergence.py [--quick] [--seeds 0 1 2] [--methods ...]

The model, data, optimizer and budget of ``commpress train --data lm`` (a 2-layer byte-level
transformer, AdamW at 3e-3, batch 32 per rank, one epoch: 140 steps at 2 ranks), but sharded
with FSDP2: each transformer block is an FSDP module of its own, then the root. Two gloo
ranks on this machine; every method starts from the same weights and sees the same batches.
Methods: ``fp32`` and ``bf16`` (FSDP's own reduce-scatter, bf16 as its reduce dtype), and
commpress hook names through :func:`commpress.fsdp.compress` with the fixed policy (the codec
on every reduce-scatter). Reported: test loss (nats per byte) and next-byte accuracy, the mean
over seeds, each against fp32's.

Results: ``--out`` (default ``benchmarks/results/local/fsdp_convergence.json``) and ``.md``,
``.png`` next to it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py
from report import out_argument, pyplot, save  # noqa: E402

METHODS = ["fp32", "bf16", "qsgd8", "qsgd4", "qsgd4+ef"]
BATCH, LR = 32, 3e-3


def sharded_lm(seed: int, method: str):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from commpress.train import make_model

    model = make_model(seed, "lm")
    options = ({"mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)}
               if method == "bf16" else {})
    for block in model.blocks.layers:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def train(method: str, seed: int, rank: int, world: int, data, steps: int) -> dict:
    import torch

    import commpress as cp

    x_train, y_train, x_test, y_test = data
    model = sharded_lm(seed, method)
    state = None if method in ("fp32", "bf16") else cp.fsdp.compress(model, method,
                                                                    policy="fixed", seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    shard = torch.arange(rank, len(y_train), world)
    order = shard[torch.randperm(len(shard), generator=torch.Generator().manual_seed(seed + rank))]
    for step in range(steps):
        idx = order[step * BATCH:(step + 1) * BATCH]
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # every rank runs the forward (its all-gathers are collective)
        logits = model(x_test)
        accuracy = (logits.argmax(1) == y_test).float().mean().item()
        test_loss = torch.nn.functional.cross_entropy(logits, y_test).item()
    # FSDP's own reduce-scatter sends its reduce dtype: fp32, or bf16 (half the bytes)
    own = 2.0 if method == "bf16" else 1.0
    return {"method": method, "seed": seed, "test_loss": test_loss, "accuracy": accuracy,
            "ratio": state.stats.ratio if state is not None else own}


def worker(rank: int, world: int, port: int, args, queue) -> None:
    import os

    import torch
    import torch.distributed as dist

    from commpress.train import load_data

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = load_data("lm", 0)
    steps = args.steps or len(data[1]) // world // BATCH
    rows = [train(method, seed, rank, world, data, steps)
            for seed in args.seeds for method in args.methods]
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def summarize(rows) -> list:
    base = {r["seed"]: r for r in rows if r["method"] == "fp32"}
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        loss = statistics.mean(r["test_loss"] for r in mine)
        fp32 = statistics.mean(base[r["seed"]]["test_loss"] for r in mine)
        out.append({"method": method, "test_loss": loss, "loss_vs_fp32": loss / fp32 - 1,
                    "accuracy": statistics.mean(r["accuracy"] for r in mine),
                    "accuracy_sd": statistics.stdev(r["accuracy"] for r in mine) if len(mine) > 1 else 0.0,
                    "accuracy_vs_fp32": statistics.mean(r["accuracy"] - base[r["seed"]]["accuracy"]
                                                        for r in mine),
                    "ratio": statistics.mean(r["ratio"] for r in mine), "seeds": len(mine)})
    return out


def table(summary) -> str:
    lines = ["| method | test loss | vs fp32 | next-byte acc | sd | vs fp32 | bytes vs fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {r['method']} | {r['test_loss']:.4f} | {100 * r['loss_vs_fp32']:+.2f}% "
                     f"| {100 * r['accuracy']:.2f}% | {100 * r['accuracy_sd']:.2f} "
                     f"| {100 * r['accuracy_vs_fp32']:+.2f} pp | {1 / r['ratio']:.3f} |")
    return "\n".join(lines)


def plot(summary, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["method"] for r in summary], [100 * r["loss_vs_fp32"] for r in summary])
    ax.axhline(1.0, color="C3", linestyle="--", label="+1% (the target)")
    ax.set(ylabel="test loss vs fp32 FSDP (%)", title="byte-level LM under FSDP, 2 ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    import torch.multiprocessing as mp

    from commpress.train import _free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--steps", type=int, help="default: one epoch")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 3 steps, fp32 and qsgd4: a smoke test (CI)")
    out_argument(parser, "fsdp_convergence")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.methods = [0], 3, ["fp32", "qsgd4"]
    if "fp32" not in args.methods:
        args.methods = ["fp32"] + args.methods  # the baseline every method is read against
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(worker, args=(2, _free_port(), args, queue), nprocs=2,
                       start_method="spawn")
    rows = queue.get()
    summary = summarize(rows)
    save(args.out, "fsdp_convergence.py", argv, summary, plot, table(summary), runs=rows)


if __name__ == "__main__":
    main()
