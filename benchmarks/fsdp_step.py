"""FSDP training step time on a communication-bound model over a rate-limited network.

Usage (root, iproute2): python benchmarks/fsdp_step.py [--quick] [--rates 1gbit 10gbit]
    [--nodes 2] [--model mlp|lm] [--width 1536] [--layers 4] [--methods ...]

Two models, every rank on its own ``commpress netsim`` node:

- ``mlp`` (default): ``ddp_step.py``'s model and data (a stack of ``width x width`` Linear
  layers, 28 MB of fp32 gradients at the default 1536, batch 32 per rank, SGD with momentum),
  each Linear layer its own FSDP2 module (``fully_shard``), the stack the root. Communication
  dominates its step: it shows what the reduce-scatter can gain.
- ``lm``: the byte-level transformer of ``commpress train --data lm`` widened
  (``commpress.train.ByteLM(width, layers)``; ``--width 384 --layers 4``: 7.3M parameters, 29
  MB of fp32 gradients), batch 8 sequences of 64 random bytes per rank, AdamW; each
  transformer block its own FSDP2 module, the model the root. A real model's mix of compute
  and communication.

 Per method: the median wall time of ``--steps`` timed steps (forward, backward
with the reduce-scatters, optimizer step, each started by a barrier) after ``--warmup``, the
bytes that left node 0 per step (its interface counter), and the reduce-scatters' own seconds
per step (FSDP's own timed around the call its default makes). Methods:

- ``fp32``: FSDP's own reduce-scatter in fp32; ``bf16``: FSDP's own with
  ``MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)``, what FSDP users switch on to halve
  the bytes;
- commpress hook names (``qsgd4``, ``qsgd8``, ``natural``, ``qsgd4+ef`` ...) through
  :func:`commpress.fsdp.compress` with the fixed policy (the codec on every module), in fp32;
  ``NAME/bf16``: the same with a bf16 reduce dtype; ``NAME@two_hop``: in two hops
  (``two_hop=True``: inside the node uncompressed, the codec between nodes); ``NAME@hsdp``:
  hybrid sharding (each module sharded inside the node, its cross-node all-reduce through
  commpress), and ``fp32@hsdp`` / ``bf16@hsdp`` FSDP's own hybrid sharding (a 2-D mesh). The
  ``@`` variants need ``--ranks-per-node 2`` or more;
- ``calibrated:NAME``: the same hook under the default policy, which times FSDP's own
  reduce-scatter, the same in bf16, and the codec per module, then runs trial steps; it warms
  up until it has adopted its plan (in the results).

Results: ``--out`` (default ``benchmarks/results/local/fsdp_step.json``, untracked) and
``.png``, ``.md`` next to it; the table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py, ddp_step.py
from ddp_step import add_step_arguments, make_model, plot, run_rates, table, timed_steps  # noqa: E402
from report import out_argument, save  # noqa: E402

METHODS = ["fp32", "bf16", "qsgd4", "qsgd8", "natural", "qsgd4+ef", "qsgd4/bf16",
           "calibrated:qsgd4"]
QUICK_METHODS = ["fp32", "bf16", "qsgd4", "qsgd4+ef", "calibrated:qsgd4"]


class TimedReduceScatter:
    """FSDP's own reduce-scatter (the call its default makes), timed: the seconds it took,
    added up (on the CPU FSDP issues it synchronously)."""

    seconds = 0.0

    def allocate(self, size, *, dtype, device):
        import torch
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        import torch.distributed as dist
        start = time.perf_counter()
        work = dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group,
                                          async_op=async_op)
        TimedReduceScatter.seconds += time.perf_counter() - start
        return work


LM_BATCH = 8


def build_model(args):
    """``(model, its FSDP modules below the root)`` of ``--model``."""
    import torch

    torch.manual_seed(0)
    if args.model == "lm":
        from commpress.train import ByteLM
        model = ByteLM(args.width, args.layers)
        return model, list(model.blocks.layers)
    model = make_model(args.width)
    return model, [layer for layer in model if isinstance(layer, torch.nn.Linear)]


def lm_batch(generator):
    import torch

    from commpress.train import LM_CONTEXT
    data = torch.randint(0, 256, (LM_BATCH, LM_CONTEXT + 1), generator=generator)
    return data[:, :-1], data[:, 1:]


def sharded(args, method: str):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    import commpress as cp

    nodes, ranks_per_node = args.nnodes, args.ranks_per_node
    model, modules = build_model(args)
    policy = "calibrated" if method.startswith("calibrated:") else "fixed"
    name, _, dtype = method.removeprefix("calibrated:").partition("/")
    name, _, hops = name.partition("@")
    if hops not in ("", "two_hop", "hsdp"):
        raise ValueError(f"fsdp_step: {method!r}: the @-variants are @two_hop and @hsdp")
    bf16 = name == "bf16" or dtype == "bf16"
    options = {"mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)} if bf16 else {}
    mesh = None
    if hops == "hsdp":  # ranks are numbered node by node
        mesh = init_device_mesh("cpu", (nodes, ranks_per_node), mesh_dim_names=("replicate", "shard"))
        own = name in ("fp32", "bf16")  # FSDP's own hybrid sharding takes the 2-D mesh
        options["mesh"] = mesh if own else mesh["shard"]
    for module in modules:
        fully_shard(module, **options)
    fully_shard(model, **options)
    if name in ("fp32", "bf16"):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_custom_reduce_scatter(TimedReduceScatter())
        return model, None
    return model, cp.fsdp.compress(
        model, name, policy=policy, two_hop=hops == "two_hop",
        replicate_group=mesh["replicate"].get_group() if mesh is not None else None)


def run_method(method, args, rank, ifname):
    import torch

    model, state = sharded(args, method)
    if args.model == "lm":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    comm = {}

    def reduce_scatter_seconds():
        return state.stats.comm_seconds if state is not None else TimedReduceScatter.seconds

    def train_step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss
    row = timed_steps(method, args, rank, ifname, model, state, train_step,
                      on_timing=lambda: comm.update(before=reduce_scatter_seconds()),
                      make_batch=lm_batch if args.model == "lm" else None)
    row["reduce_scatter_s"] = (reduce_scatter_seconds() - comm["before"]) / args.steps
    return row


def worker(args) -> None:
    import torch.distributed as dist

    from commpress.comm.transport import release_default_group
    from commpress.netsim import join_job

    rank = join_job(args)
    rows = []
    for method in args.methods:
        row = run_method(method, args, rank, os.environ["NETSIM_IFNAME"])
        rows.append({**row, "world_size": dist.get_world_size(), "nodes": args.nnodes,
                     "ranks_per_node": args.ranks_per_node, "model": args.model,
                     "width": args.width, "layers": args.layers})
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))
    release_default_group()


def reduce_scatter_table(results) -> str:
    """The reduce-scatters' own time per step, against FSDP's bf16 one of the same run."""
    lines = ["", "| rate | nodes x ranks | method | reduce-scatter ms/step | vs bf16's |",
             "|---|---|---|---:|---:|"]
    rows = [r for r in results if "reduce_scatter_s" in r]
    for r in rows:
        bf16 = next((b for b in rows if b["method"] == "bf16" and b["rate"] == r["rate"]
                     and b["nodes"] == r["nodes"]), None)
        ratio = f"{bf16['reduce_scatter_s'] / r['reduce_scatter_s']:.2f}x" if bf16 else "-"
        lines.append(f"| {r['rate']} | {r['nodes']} x {r['ranks_per_node']} | {r['method']} "
                     f"| {1e3 * r['reduce_scatter_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    from commpress.netsim import add_job_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--model", choices=["mlp", "lm"], default="mlp")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (--model lm)")
    add_step_arguments(parser, METHODS, QUICK_METHODS, "width 256, 1gbit, 2 timed steps")
    out_argument(parser, "fsdp_step")
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.width, args.rates, args.steps, args.methods = 256, ["1gbit"], 2, QUICK_METHODS
        args.layers = min(args.layers, 2)
    results = run_rates(Path(__file__), args, "fsdp_step",
                        ["--model", args.model, "--layers", str(args.layers)])
    save(args.out, "fsdp_step.py", argv, results, plot,
         table(results) + "\n" + reduce_scatter_table(results))


if __name__ == "__main__":
    main()
