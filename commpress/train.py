"""The main job: data-parallel training with compressed gradients, side by side with fp32.

``commpress train`` starts W worker processes joined by gloo on CPU, or by NCCL with one GPU
each where CUDA is available (``--device``/``--backend``; or joins the group torchrun set up,
when launched by torchrun), trains the same model (a small CNN, logistic regression on the
LIBSVM-like set, or a byte-level transformer language model) from the same initial weights once
per method on a disjoint shard of the data per rank, and prints a report: test accuracy (for
the language model: next-byte accuracy), final loss, bytes each rank sent, the saving against
the fp32 all-reduce, and time.

Data ships with scikit-learn (the 8x8 digits, 1797 images) or with Python (the standard
library's own source files, for the language model), or is synthetic; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .acdc import ACDC, ACDCSchedule
from .comm.calibration import POLICIES
from .config import ALGORITHMS
from .comm.transport import release_default_group
from .ddp import register_hook, state_from_name

logger = logging.getLogger("commpress.train")
BASELINE = "fp32-allreduce"


DATA = ("digits", "synthetic", "libsvm", "lm")
#: the LIBSVM-like set: sparse binary features, unit-norm rows, two classes from a planted model
LIBSVM_SHAPE = (15_000, 2_000)
#: the language model's corpus: this many bytes of the standard library's sources, cut into
#: sequences of LM_CONTEXT bytes (the model predicts every next byte)
LM_CORPUS_BYTES, LM_CONTEXT = 640_000, 64
#: per data set: (optimizer, learning rate) when --optimizer/--lr are not given
DEFAULTS = {"digits": ("sgd", 0.05), "synthetic": ("sgd", 0.05), "libsvm": ("sgd", 2.0),
            "lm": ("adamw", 3e-3)}


def load_data(name: str, seed: int):
    """``(x_train, y_train, x_test, y_test)``: 1x8x8 images and class labels, or for
    ``libsvm`` feature vectors and binary labels."""
    gen = torch.Generator().manual_seed(seed)
    if name == "lm":
        return lm_corpus()
    if name == "libsvm":
        x, y = _libsvm_like(gen)
    elif name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            sys.exit("commpress train: --data digits needs scikit-learn "
                     "(pip install scikit-learn), or use --data synthetic")
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
    elif name == "synthetic":
        # 10 classes of noisy 8x8 templates: learnable, but not in one step
        templates = torch.randn(10, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (2000,), generator=gen)
        x = templates[y] + 1.5 * torch.randn(2000, 1, 8, 8, generator=gen)
    else:
        raise ValueError(f"unknown data set {name!r}; choose from {DATA}")
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def _libsvm_like(gen: torch.Generator):
    """Text-like binary features (feature j present with a Zipf-like probability, about 40
    per row), rows scaled to unit norm as LIBSVM's preprocessed sets are, labels from a planted
    linear model with 5% of them flipped: a convex problem a linear model cannot fit exactly."""
    n, d = LIBSVM_SHAPE
    rates = (0.2 / torch.arange(1, d + 1, dtype=torch.float32) ** 0.5).clamp(max=0.5)
    x = (torch.rand(n, d, generator=gen) < rates).float()
    x /= x.norm(dim=1, keepdim=True).clamp(min=1.0)
    w = torch.randn(d, generator=gen)
    score = x @ w
    y = (score > score.median()).long()
    flip = torch.rand(n, generator=gen) < 0.05
    return x, torch.where(flip, 1 - y, y)


def lm_corpus(corpus_bytes: int = LM_CORPUS_BYTES):
    """Byte sequences from the first ``corpus_bytes`` of the Python standard library's own
    top-level ``.py`` files (about 4.7 MB in all), in sorted path order (the same on every
    machine with this Python): the first 90% of the corpus trains, the last 10% (other files)
    is held out. ``x`` holds ``LM_CONTEXT`` bytes, ``y`` the same shifted by one."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = bytearray()
    for path in sorted(root.glob("*.py")):  # the top level: no tests, no site-packages
        corpus += path.read_bytes()
        if len(corpus) >= corpus_bytes:
            break
    data = torch.tensor(list(corpus[:corpus_bytes]), dtype=torch.int64)
    n = (len(data) - 1) // LM_CONTEXT
    x = data[:n * LM_CONTEXT].view(n, LM_CONTEXT)
    y = data[1:n * LM_CONTEXT + 1].view(n, LM_CONTEXT)
    split = int(0.9 * n)
    return x[:split], y[:split], x[split:], y[split:]


class ByteLM(nn.Module):
    """A 2-layer causal transformer over bytes (d=128, 4 heads): logits shaped ``(batch, 256,
    positions)``, so that ``cross_entropy(model(x), y)`` and ``argmax(1) == y`` work on it as on
    the classifiers."""

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(0.02 * torch.randn(LM_CONTEXT, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(LM_CONTEXT),
                             persistent=False)

    def forward(self, x):
        t = x.shape[1]
        h = self.blocks(self.embed(x) + self.position[:t], mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(h)).transpose(1, 2)


def make_model(seed: int, data: str = "digits") -> nn.Module:
    torch.manual_seed(seed)
    if data == "lm":
        return ByteLM()
    if data == "libsvm":  # logistic regression (two-class softmax)
        return nn.Linear(LIBSVM_SHAPE[1], 2)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


def parse_method(method: str):
    """``(hook, sparsity)``: ``"qsgd4"`` -> ``("qsgd4", None)``; ``"acdc90"`` -> AC/DC at 90%
    with the fp32 hook; ``"acdc90:qsgd4"`` -> AC/DC at 90% with QSGD-4."""
    if not method.startswith("acdc"):
        return method, None
    level, _, hook = method[4:].partition(":")
    if not level.isdigit() or not 0 <= int(level) < 100:
        raise ValueError(f"bad AC/DC method {method!r}: expected acdcNN or acdcNN:HOOK with "
                         "NN the sparsity in percent")
    return hook or "fp32", int(level) / 100


#: PyTorch's PowerSGD hook starts after this many fp32 steps here (as in benchmarks/ddp_step.py)
POWERSGD_START = 2


def powersgd_rank(method: str) -> Optional[int]:
    """``R`` for ``"powersgdR"`` (PyTorch's own PowerSGD hook at rank R, for comparison), else
    None."""
    digits = method[len("powersgd"):]
    return int(digits) if method.startswith("powersgd") and digits.isdigit() and int(digits) > 0 else None


def powersgd_bytes_per_step(module: nn.Module, rank: int, world_size: int) -> float:
    """What one rank sends per step of PyTorch's PowerSGD hook, under the ring accounting used
    for the codecs: the P (n x r) and Q (m x r) factors of each matrix it compresses, and fp32
    for what it leaves alone (vectors, and matrices where ``(n + m) r`` is not below half of
    ``n m``: its ``min_compression_rate`` of 2), as its ``_should_compress`` decides."""
    elements = 0
    for p in module.parameters():
        if p.dim() <= 1:
            elements += p.numel()
            continue
        n, m = p.shape[0], p.numel() // p.shape[0]
        r = min(n, m, rank)
        elements += (n + m) * r if (n + m) * r * 2 < n * m else n * m
    return 2 * (world_size - 1) / world_size * 4 * elements


def evaluate(module, x_test, y_test):
    with torch.no_grad():
        logits = module(x_test)
        return ((logits.argmax(1) == y_test).float().mean().item(),
                nn.functional.cross_entropy(logits, y_test).item())


def train_one(method: str, args, data, rank: int, world_size: int) -> Dict:
    x_train, y_train, x_test, y_test = data
    device = x_train.device
    powersgd = powersgd_rank(method)
    # PowerSGD gets one bucket: with two, its callbacks (which issue further collectives)
    # deadlock gloo's worker threads (PyTorch tests PowerSGD on NCCL only)
    model = DDP(make_model(args.seed, args.data).to(device),
                device_ids=[device] if device.type == "cuda" else None,
                bucket_cap_mb=1024 if powersgd else None)
    shard = torch.arange(rank, len(y_train), world_size)  # disjoint shard per rank
    # the same on every rank (shards differ by one when W does not divide the data): a rank
    # running one more backward than the others would wait for them forever
    steps_per_epoch = len(y_train) // world_size // args.batch_size
    state, acdc = None, None
    opt = (torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
           if args.optimizer == "adamw" else
           torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))
    if powersgd:
        model.register_comm_hook(powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=powersgd,
            start_powerSGD_iter=POWERSGD_START, random_seed=args.seed), powerSGD_hook.powerSGD_hook)
    elif method != BASELINE:
        hook, sparsity = parse_method(method)
        state = register_hook(model, hook, collective=args.collective, seed=args.seed,
                              log_every=0, policy=args.policy)
        if sparsity is not None:
            acdc = ACDC(model, opt, state, sparsity=sparsity,
                        schedule=ACDCSchedule.paper(args.epochs * steps_per_epoch,
                                                    last_dense=args.acdc_last_dense))
    bar = tqdm(total=args.epochs * steps_per_epoch, desc=f"{method:>16}", leave=True,
               disable=rank != 0 or args.quiet, mininterval=1.0)  # stderr, as tqdm does
    gen = torch.Generator().manual_seed(args.seed + rank)
    dense_per_step = 2 * (world_size - 1) / world_size * 4 * sum(p.numel() for p in model.parameters())
    powersgd_per_step = powersgd_bytes_per_step(model.module, powersgd, world_size) if powersgd else 0

    def sent(steps_done: int) -> float:  # bytes this rank put on the network so far
        if state is not None:
            return state.stats.network_bytes
        if powersgd:
            fp32_steps = min(steps_done, POWERSGD_START)
            return dense_per_step * fp32_steps + powersgd_per_step * (steps_done - fp32_steps)
        return dense_per_step * steps_done
    # every eval_every steps and at the end: steps, bytes sent so far, training seconds so far
    # (evaluation excluded), test accuracy and loss
    curve = []
    eval_every = args.eval_every or steps_per_epoch
    started, evaluating, steps_done = time.perf_counter(), 0.0, 0
    for _ in range(args.epochs):
        perm = shard[torch.randperm(len(shard), generator=gen)]
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if acdc is not None:
                acdc.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            steps_done += 1
            if steps_done % eval_every == 0 or steps_done == args.epochs * steps_per_epoch:
                tick = time.perf_counter()
                accuracy, test_loss = evaluate(model.module, x_test, y_test)
                curve.append({"steps": steps_done, "accuracy": accuracy, "test_loss": test_loss,
                              "wire_bytes": sent(steps_done), "seconds": tick - started - evaluating})
                evaluating += time.perf_counter() - tick
    elapsed = time.perf_counter() - started - evaluating
    bar.close()
    model.eval()
    accuracy, test_loss = evaluate(model.module, x_test, y_test)
    extra = {}
    if acdc is not None:
        _, dense_weights = acdc.sparse_dense_pair()
        dense_member = make_model(args.seed, args.data).to(device)
        dense_member.load_state_dict(dense_weights)
        member_accuracy, member_loss = evaluate(dense_member.eval(), x_test, y_test)
        extra = {"dense_member_accuracy": member_accuracy, "dense_member_test_loss": member_loss,
                 "final_density": acdc.density,
                 "sparse_phase_bytes_per_step": state.phase_stats["sparse"].per_step()["network_bytes"],
                 "dense_phase_bytes_per_step": state.phase_stats["dense"].per_step()["network_bytes"]}
    steps = args.epochs * steps_per_epoch
    dense = dense_per_step * steps
    wire = sent(steps)
    identical = _replicas_identical(model)
    return {"method": method, "accuracy": accuracy, "test_loss": test_loss,
            "train_loss": loss.item(), "wire_bytes": wire, "fp32_bytes": dense,
            "intra_node_bytes": state.stats.intra_node_bytes if state else 0,
            "ratio": dense / wire if wire else float("nan"), "seconds": elapsed,
            "steps": steps, "replicas_identical": identical, "curve": curve,
            "encode_seconds": state.stats.encode_seconds if state else 0.0,
            "decode_seconds": state.stats.decode_seconds if state else 0.0,
            "plan": state.stats.plan if state else "", **extra}


def _replicas_identical(model) -> bool:
    """Bitwise equality of the parameters across ranks (NaN included)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).view(torch.int32)
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


MODELS = {"digits": "small CNN", "synthetic": "small CNN", "libsvm": "logistic regression",
          "lm": "byte-level transformer (next-byte accuracy)"}


def report(results: List[Dict], args, world_size: int) -> str:
    base = next(r for r in results if r["method"] == BASELINE)
    device, backend = device_and_backend(args)
    lines = [
        f"commpress train: {world_size} workers ({backend}, {device.upper()}), "
        f"{MODELS[args.data]} on {args.data} data, {args.optimizer} lr {args.lr:g}, "
        f"{args.epochs} epochs, batch {args.batch_size} per rank, {results[0]['steps']} steps, "
        f"policy {args.policy}",
        "",
        f"{'method':<26}{'test acc':>9}{'vs fp32':>9}{'test loss':>10}{'MB sent/rank':>14}"
        f"{'saving':>8}{'time s':>8}  replicas",
    ]
    for r in results:
        name = r["method"] + (f" sparse {100 * (1 - r['final_density']):.0f}%"
                              if "final_density" in r else "")
        saving = f"{r['ratio']:.2f}x" if r["wire_bytes"] else "-"  # one worker sends nothing
        lines.append(
            f"{name:<26}{100 * r['accuracy']:>8.2f}%{100 * (r['accuracy'] - base['accuracy']):>+8.2f}p"
            f"{r['test_loss']:>10.4f}{r['wire_bytes'] / 1e6:>14.3f}{saving:>8}"
            f"{r['seconds']:>8.1f}  {'identical' if r['replicas_identical'] else 'DIVERGED'}")
        if "dense_member_accuracy" in r:
            acc = r["dense_member_accuracy"]
            lines.append(f"{r['method'] + ' dense':<26}{100 * acc:>8.2f}%"
                         f"{100 * (acc - base['accuracy']):>+8.2f}p   (same run: weights at the end "
                         f"of its last dense phase)")
    lines += ["", "MB sent/rank: bytes this rank put on the network (ring/all-to-all accounting; "
              "the hierarchical collective's node-local traffic is not counted); "
              "saving: fp32 all-reduce bytes / bytes sent."]
    lines += [f"{r['method']} {r['plan']}" for r in results if r.get("plan")]
    acdc = [r for r in results if "sparse_phase_bytes_per_step" in r]
    for r in acdc:
        lines.append(f"{r['method']}: {r['sparse_phase_bytes_per_step'] / 1e3:.1f} kB per step in "
                     f"sparse phases vs {r['dense_phase_bytes_per_step'] / 1e3:.1f} kB in dense ones "
                     f"({r['sparse_phase_bytes_per_step'] / r['dense_phase_bytes_per_step']:.3f}x)")
    return "\n".join(lines)


def device_and_backend(args):
    """``--device``/``--backend``, resolved: CUDA and NCCL when there is a GPU for each of this
    node's ranks (NCCL refuses two ranks on one GPU), else CPU and gloo."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # torchrun's ranks on this node, else the workers this command spawns
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1 if "RANK" in os.environ else args.workers))
    device = args.device if args.device != "auto" else ("cuda" if gpus >= local else "cpu")
    backend = args.backend if args.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if device == "cuda" and not gpus:
        raise SystemExit("commpress train: --device cuda, but CUDA is not available")
    if backend == "nccl" and device != "cuda":
        raise SystemExit("commpress train: --backend nccl needs --device cuda")
    if backend == "nccl" and gpus < local:
        raise SystemExit(f"commpress train: NCCL needs a GPU per rank: {local} ranks on this node, "
                         f"{gpus} GPU(s); use fewer --workers, or --backend gloo")
    return device, backend


def worker(rank: int, world_size: int, args) -> Optional[List[Dict]]:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    device, backend = device_and_backend(args)
    if device == "cuda":  # one GPU per local rank (torchrun's LOCAL_RANK, else the rank)
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    data = [t.to(device) for t in load_data(args.data, args.seed)]
    results = []
    for method in [BASELINE] + args.methods:
        results.append(train_one(method, args, data, rank, world_size))
        # A DDP model lives in reference cycles, so only the cyclic collector frees it, on
        # whichever thread it next runs: possibly a gloo thread running the next model's hook
        # callbacks (PowerSGD's), where tearing down a reducer is unsafe. Free it here.
        gc.collect()
    if rank == 0:
        print("\n" + report(results, args, world_size), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": world_size, "args": vars(args), "results": results}, f, indent=1)
    release_default_group()
    return results


def _spawned(rank, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker(rank, world_size, args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("methods", nargs="*", default=["qsgd4", "qsgd8", "natural"],
                        help="hooks to compare with fp32, e.g. qsgd4 natural dithering qsgd4+ef "
                             "natural+ef21 fp16, or powersgd1, powersgd4 (PyTorch's PowerSGD "
                             "hook at that rank) (default: qsgd4 qsgd8 natural)")
    parser.add_argument("-n", "--workers", type=int, default=2,
                        help="worker processes when not launched by torchrun (default 2)")
    parser.add_argument("--collective", default="auto", choices=["auto", *ALGORITHMS],
                        help="how compressed gradients are reduced (default auto: allgather at "
                             "2 ranks, reduce_scatter beyond, hierarchical on several nodes of "
                             "several ranks)")
    parser.add_argument("--policy", default="fixed", choices=POLICIES,
                        help="fixed (default here, to compare methods): each method's codec on "
                             "every bucket; calibrated (the library's default): time fp32, fp16 "
                             "and the codec in a warm-up step and compress only the buckets "
                             "where it pays, which on one machine's loopback is usually none")
    parser.add_argument("--acdc", type=float, metavar="SPARSITY",
                        help="(default: off) also run AC/DC at this sparsity (paper schedule scaled to the run), "
                             "with the fp32 hook and with qsgd4: methods acdcNN and acdcNN:qsgd4")
    parser.add_argument("--acdc-last-dense", type=float, metavar="FRACTION",
                        help="AC/DC: at least this fraction of the run is dense before the final "
                             "sparse phase, where the dense member is taken (default 0.10, the "
                             "paper's)")
    parser.add_argument("--data", default="digits", choices=DATA,
                        help="(default digits) digits (scikit-learn's, small CNN), synthetic (images, CNN), "
                             "libsvm (LIBSVM-like sparse binary features, logistic regression) or "
                             "lm (a byte-level transformer on the standard library's sources)")
    parser.add_argument("--epochs", type=int, default=15, help="passes over the data (default 15)")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker (default 32)")
    parser.add_argument("--eval-every", type=int, metavar="STEPS",
                        help="test the model every STEPS steps for the learning curves in "
                             "--json (default: once per epoch)")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"],
                        help="sgd (momentum 0.9) or adamw (weight decay 0.01); default: adamw "
                             "for lm, sgd otherwise")
    parser.add_argument("--lr", type=float,
                        help="learning rate; default: 0.05 (digits, synthetic), 2.0 (libsvm), "
                             "0.003 (lm)")
    parser.add_argument("--seed", type=int, default=0,
                        help="model, data order and compression randomness (default 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to train (auto: cuda when available, else cpu)")
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                        help="torch.distributed backend (auto: nccl on cuda, else gloo)")
    parser.add_argument("--json", help="also write the results to this JSON file (default: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("func", "command")})
    optimizer, lr = DEFAULTS[args.data]
    args.optimizer = args.optimizer or optimizer
    args.lr = lr if args.lr is None else args.lr
    if args.acdc is None and args.acdc_last_dense is not None:
        raise SystemExit("commpress train: --acdc-last-dense shapes the AC/DC schedule: it needs "
                         "--acdc SPARSITY")
    args.acdc_last_dense = 0.10 if args.acdc_last_dense is None else args.acdc_last_dense
    if args.acdc is not None:
        if not 0 <= args.acdc < 1:
            raise SystemExit(f"commpress train: --acdc must be in [0, 1), got {args.acdc}")
        try:
            ACDCSchedule.paper(100, last_dense=args.acdc_last_dense)
        except ValueError as exc:
            raise SystemExit(f"commpress train: --acdc-last-dense: {exc}") from None
        level = round(100 * args.acdc)
        args.methods = list(args.methods) + [f"acdc{level}", f"acdc{level}:qsgd4"]
    args.methods = [m.lower() for m in args.methods]  # hook names are case-insensitive
    for method in args.methods:  # fail on a bad name here, not in W workers
        try:
            if not powersgd_rank(method):
                state_from_name(parse_method(method)[0], collective=args.collective)
        except ValueError as exc:
            raise SystemExit(f"commpress train: {exc}; or powersgdR (PyTorch's PowerSGD hook at "
                             f"rank R, e.g. powersgd1, powersgd4)") from None
    if args.workers < 1:
        raise SystemExit("commpress train: --workers must be >= 1")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise SystemExit(f"commpress train: {flag} must be >= 1, got {value}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise SystemExit(f"commpress train: --lr must be a positive number, got {args.lr}")
    if args.eval_every is not None and args.eval_every < 1:
        raise SystemExit(f"commpress train: --eval-every must be >= 1, got {args.eval_every}")
    device_and_backend(args)  # fail on a bad combination before starting workers
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if torchrun else args.workers
    examples = len(load_data(args.data, args.seed)[1])
    if examples // world_size // args.batch_size < 1:  # not one step per epoch
        raise SystemExit(f"commpress train: {args.data} has {examples} training examples, fewer "
                         f"than --batch-size {args.batch_size} x {world_size} workers")
    if torchrun:
        worker(int(os.environ["RANK"]), world_size, args)
        return
    torch.multiprocessing.start_processes(_spawned, args=(args.workers, _free_port(), args),
                                          nprocs=args.workers, start_method="spawn")
