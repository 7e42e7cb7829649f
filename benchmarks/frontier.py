"""Bits on the wire against error, on real gradients: each codec plain and rotated.

Usage: python benchmarks/frontier.py [--quick] [--tasks digits lm] [--steps 100]

The gradients are theory.py's (the layers the hook compresses, at the first, middle and last
of ``--steps`` training steps of each task). For each codec the report gives the bits per
entry of its payload (headers and scales included) and the normalized error
``E||C(g) - g||^2 / ||g||^2``, computed exactly from the rounding probabilities
(:meth:`commpress.Codec.expected_sq_error`; theory.py checks it against Monte Carlo), the
mean over the kept gradients (a deterministic codec's one outcome). Codecs: packed QSGD 1-8
bits (the hooks' buckets: 128 values up to 2 bits, 512 above), QSGD 1 bit on buckets of 2048,
the scaled sign (:class:`commpress.ScaledSign`, biased, for error feedback), natural
dithering, C_nat, variable-length QSGD (:class:`commpress.EliasQSGD`: ``eliasS``, the paper's
L2 buckets of 512 with ``S`` levels, and ``qsgdBe``, packed QSGD-B's max-norm codes
Elias-coded), and each rotated by a randomized Hadamard transform (:class:`commpress.Rotated`,
blocks of 256). A variable-length codec's bits are its payloads' own (the mean over the
gradients), a fixed-width codec's its formula.

Results: ``--out`` (default ``benchmarks/results/local/frontier.json``) and ``.md``, ``.png``
next to it (the frontier: error against bits, log scale).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, theory.py
from report import out_argument, pyplot, save  # noqa: E402
from theory import add_gradient_arguments, gradients  # noqa: E402


def codecs():
    """``{label: codec}``: the plain codecs, then each rotated."""
    import commpress as cp

    plain = {f"qsgd{b}": cp.QSGD(bits=b, bucket_size=128 if b <= 2 else 512) for b in range(1, 9)}
    plain["qsgd1/2048"] = cp.QSGD(bits=1, bucket_size=2048)
    plain["sign"] = cp.ScaledSign()
    plain["dithering"] = cp.NaturalDithering()
    plain["natural"] = cp.NaturalCompression()
    plain.update({f"elias{s}": cp.EliasQSGD(levels=s) for s in (1, 2, 3, 4, 6, 8, 12, 16)})
    plain.update({f"qsgd{b}e": cp.codec_from_name(f"qsgd{b}e") for b in (2, 3, 4)})
    return {**plain, **{f"{label}+rot": cp.Rotated(codec) for label, codec in plain.items()}}


def sq_error(codec, g):
    """``E||C(g) - g||^2``: exact from the rounding probabilities, or for a deterministic
    codec its one outcome."""
    if codec.stochastic:
        return codec.expected_sq_error(g).double()
    return (codec.decode(codec.encode(g)).double() - g.double()).square().sum()


def measure(task: str, steps: int) -> list:
    import torch

    rows = []
    kept = gradients(task, steps)
    for label, codec in codecs().items():
        errors = [(sq_error(codec, g) / g.double().square().sum()).item() for _, g in kept]
        numel = kept[0][1].numel()
        sizes = [codec.encode(g, torch.Generator().manual_seed(0)).nbytes for _, g in kept]
        rows.append({"task": task, "codec": label, "numel": numel,
                     "bits_per_entry": 8 * sum(sizes) / len(sizes) / numel,
                     "error": sum(errors) / len(errors), "errors": errors,
                     "rotated": label.endswith("+rot")})
    return rows


def table(rows) -> str:
    lines = ["| task | codec | bits/entry | error | rotated bits | rotated error | rotation gain |",
             "|---|---|---:|---:|---:|---:|---:|"]
    by = {(r["task"], r["codec"]): r for r in rows}
    for r in rows:
        if r["rotated"]:
            continue
        rot = by[(r["task"], r["codec"] + "+rot")]
        lines.append(f"| {r['task']} | {r['codec']} | {r['bits_per_entry']:.3f} | {r['error']:.4g} "
                     f"| {rot['bits_per_entry']:.3f} | {rot['error']:.4g} "
                     f"| {r['error'] / rot['error']:.1f}x |")
    lines.append("")
    lines.append("error: E||C(g) - g||² / ||g||², exact, the mean over the gradients of the "
                 "first, middle and last step; bits: a payload's (variable-length codecs: "
                 "the mean over those gradients).")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for rotated, marker in ((False, "o"), (True, "^")):
            mine = [r for r in rows if r["task"] == task and r["rotated"] == rotated]
            ax.scatter([r["bits_per_entry"] for r in mine], [r["error"] for r in mine],
                       marker=marker, label="rotated" if rotated else "plain")
            for r in mine:
                ax.annotate(r["codec"].replace("+rot", ""), (r["bits_per_entry"], r["error"]),
                            fontsize=7, alpha=0.7)
        ax.set(xlabel="bits per entry on the wire", ylabel="E||C(g) - g||² / ||g||²",
               yscale="log", title=f"{task}: error against bits")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gradient_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="digits, 4 steps: a smoke test (CI), not a measurement")
    out_argument(parser, "frontier")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.steps = ["digits"], 4
    import torch

    torch.set_num_threads(1)
    rows = [row for task in args.tasks for row in measure(task, args.steps)]
    save(args.out, "frontier.py", argv, rows, plot, table(rows))


if __name__ == "__main__":
    main()
