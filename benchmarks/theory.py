"""The papers' variance bounds, checked on real gradients of the training tasks.

Usage: python benchmarks/theory.py [--quick] [--tasks digits lm] [--trials 40]

For each task of ``commpress train`` (same model, data, optimizer and learning rate) one
process trains for ``--steps`` steps with batch 32 and keeps the gradient of the layers the
hook compresses (2-D and larger, at least 1024 elements, concatenated) at the first, the
middle and the last step. Each codec then compresses each gradient ``--trials`` times, and the
report gives, relative to ``||g||^2``:

- the measured variance ``mean ||C(g) - g||^2`` and its standard error, next to the exact
  expectation (the codec's closed form, :meth:`commpress.Codec.expected_sq_error`) and the
  bound given in README (What the codecs compute): ``min(d/s^2, sqrt(d)/s)`` for QSGD with ``d``-element
  buckets and ``s`` levels (a bound for the L2 scale; commpress's default max scale is
  tighter), ``1/8`` for C_nat (``E[C(t)^2] <= 9/8 t^2``, so the second moment
  ``||C(g)||^2 / ||g||^2`` is also reported against 9/8), and
  ``1/8 + d^(1/r) 2^(1-s) min(1, d^(1/r) 2^(1-s))`` for natural dithering;
- the bias: ``||mean C(g) - g||^2`` against what ``trials`` samples of an unbiased codec give
  (``variance / trials``): a ratio near 1 is unbiased.

Results: ``--out`` (default ``benchmarks/results/local/theory.json``, untracked) and ``.md``
(and ``.png``) next to it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py
from report import out_argument, pyplot, save  # noqa: E402

CODECS = ["qsgd2", "qsgd4", "qsgd8", "natural", "dithering"]


def bound(codec) -> float:
    """The paper's bound (README, What the codecs compute) on ``E||C(g) - g||^2 / ||g||^2``."""
    import commpress as cp

    if isinstance(codec, cp.QSGD):
        d, s = codec.bucket_size, codec.levels
        if s == 0:  # one bit, signs only: scale^2 - x^2 per entry, scale <= ||v||
            return d - 1
        return min(d / s ** 2, math.sqrt(d) / s)
    if isinstance(codec, cp.NaturalDithering):
        r = min(codec.p, 2)
        term = codec.bucket_size ** (1 / r) * 2.0 ** (1 - codec.levels)
        return 1 / 8 + term * min(1.0, term)
    if isinstance(codec, cp.NaturalCompression):
        return 1 / 8
    raise ValueError(f"no bound for {codec!r}")


def gradients(task: str, steps: int, seed: int = 0):
    """``[(step, flat gradient of the compressed layers)]`` at the first, middle and last step."""
    import torch

    from commpress.train import DEFAULTS, load_data, make_model

    torch.manual_seed(seed)
    x, y, _, _ = load_data(task, seed)
    model = make_model(seed, task)
    optimizer, lr = DEFAULTS[task]
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    gen = torch.Generator().manual_seed(seed)
    keep, kept = {0, steps // 2, steps - 1}, []
    for step in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if step in keep:
            kept.append((step, torch.cat([p.grad.reshape(-1) for p in model.parameters()
                                          if p.dim() >= 2 and p.numel() >= 1024])))
        opt.step()
    return kept


def add_gradient_arguments(parser) -> None:
    """Which gradients :func:`gradients` keeps (this benchmark's and frontier.py's)."""
    parser.add_argument("--tasks", nargs="+", default=["digits", "lm"],
                        choices=["digits", "synthetic", "libsvm", "lm"])
    parser.add_argument("--steps", type=int, default=100)


def check(codec, g, trials: int, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    g64, norm2 = g.double(), g.double().square().sum().item()
    total, sq_err, sq_out = torch.zeros_like(g64), [], []
    for _ in range(trials):
        out = codec.decode(codec.encode(g, generator=gen)).double()
        total += out
        sq_err.append((out - g64).square().sum().item() / norm2)
        sq_out.append(out.square().sum().item() / norm2)
    mean_err = sum(sq_err) / trials
    se = math.sqrt(sum((e - mean_err) ** 2 for e in sq_err) / (trials - 1) / trials)
    bias = (total / trials - g64).square().sum().item() / norm2
    return {"variance": mean_err, "variance_se": se,
            "exact": codec.expected_sq_error(g).item() / norm2, "bound": bound(codec),
            "second_moment": sum(sq_out) / trials,
            "bias_vs_noise": bias / (mean_err / trials) if mean_err > 0 else float("nan")}


def table(rows) -> str:
    lines = ["| task | step | gradient elements | codec | variance / ‖g‖² | exact | bound | within bound "
             "| second moment | bias / (variance/trials) |",
             "|---|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ok = "yes" if r["variance"] <= r["bound"] + 3 * r["variance_se"] else "NO"
        lines.append(f"| {r['task']} | {r['step']} | {r['numel']} | {r['codec']} "
                     f"| {r['variance']:.4g} ± {r['variance_se']:.1g} | {r['exact']:.4g} "
                     f"| {r['bound']:.4g} | {ok} | {r['second_moment']:.4f} "
                     f"| {r['bias_vs_noise']:.2f} |")
    lines.append("")
    lines.append("C_nat's second moment bound is 9/8 = 1.125; an unbiased codec's bias ratio "
                 "is about 1 (a chi-square of one degree per coordinate, averaged).")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    """Measured variance against the bound, per codec (log scale), one point per gradient."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    for i, codec in enumerate(codecs):
        mine = [r for r in rows if r["codec"] == codec]
        ax.scatter([i] * len(mine), [r["variance"] for r in mine], marker="o", label="measured" if i == 0 else None, color="C0")
        ax.scatter([i], [mine[0]["bound"]], marker="_", s=400, color="C3", label="bound" if i == 0 else None)
    ax.set(xticks=range(len(codecs)), xticklabels=codecs, yscale="log",
           ylabel="E||C(g) - g||² / ||g||²", title="variance on real gradients vs the papers' bounds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gradient_arguments(parser)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--quick", action="store_true",
                        help="digits, 4 steps, 5 trials: a smoke test (CI), not a measurement")
    out_argument(parser, "theory")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.steps, args.trials = ["digits"], 4, 5

    import torch

    from commpress.names import codec_from_name

    torch.set_num_threads(1)
    rows = []
    for task in args.tasks:
        for step, g in gradients(task, args.steps):
            for name in CODECS:
                codec = codec_from_name(name)
                rows.append({"task": task, "step": step, "numel": g.numel(), "codec": name,
                             **check(codec, g, args.trials, seed=step)})
    failed = [r for r in rows if r["variance"] > r["bound"] + 3 * r["variance_se"]]
    save(args.out, "theory.py", argv, rows, plot, table(rows))
    if failed:
        sys.exit(f"theory: {len(failed)} measurements above their bound")


if __name__ == "__main__":
    main()
