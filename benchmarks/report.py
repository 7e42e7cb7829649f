"""What every benchmark does with its results: JSON with the command that made it, a plot."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Tuple


#: where a benchmark writes unless given --out: untracked, so a run never overwrites the
#: results committed under benchmarks/results/ unless asked to (--out benchmarks/results/...)
LOCAL_RESULTS = Path(__file__).resolve().parent / "results" / "local"


def out_argument(parser, name: str) -> None:
    """The ``--out`` option every benchmark has, defaulting to ``LOCAL_RESULTS/name.json``."""
    parser.add_argument("--out", default=str(LOCAL_RESULTS / f"{name}.json"),
                        help=f"results JSON (a plot and a markdown table go next to it); default "
                             f"{LOCAL_RESULTS.relative_to(LOCAL_RESULTS.parents[2])}/{name}.json, "
                             "untracked: pass benchmarks/results/NAME.json to update the "
                             "committed results")


def pyplot():
    """matplotlib's pyplot drawing to files only (no display on these machines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def step_time_plot(results: List[dict], path: Path, panel: Callable[[dict], tuple],
                   title: Callable[[tuple], str]) -> None:
    """Median step time per method as horizontal bars, one panel per ``panel(row)`` value
    (titled ``title(value)``), in the order the rows came."""
    plt = pyplot()
    panels = list(dict.fromkeys(panel(r) for r in results))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        rows = [r for r in results if panel(r) == key]
        ax.barh([r["method"] for r in rows], [1e3 * r["step_s"] for r in rows], color="tab:blue")
        ax.invert_yaxis()
        ax.set(xlabel="step time (ms, median)", title=title(key))
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ratio_cell(row: dict, key: str, spec: str = ".2f", suffix: str = "x") -> str:
    """A table cell for a ratio against a baseline: "-" where the run had no baseline (the
    baseline method was not among those run), not "nanx"."""
    value = row.get(key)
    return "-" if value is None else f"{value:{spec}}{suffix}"


def split_failures(results: List[dict]) -> Tuple[List[dict], List[str]]:
    """The rows that ran, and one line per method that did not, saying why."""
    ran = [r for r in results if "failed" not in r]
    why = {r["method"]: r["failed"] for r in results if "failed" in r}
    return ran, [f"\n{method} did not run: {reason}" for method, reason in why.items()]


def save(out: str, script: str, argv, results, plot: Callable, table: str, **extra) -> None:
    """Write ``{"meta", "results", **extra}`` to ``out``, and next to it ``plot(results,
    path)`` as PNG and ``table`` (markdown) as .md, headed by the command that made them;
    ``meta`` records the command line and the machine's core count."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    command = " ".join(["python", f"benchmarks/{script}"] + list(argv or sys.argv[1:]))
    meta = {"command": command, "cpu_count": os.cpu_count()}
    Path(out).write_text(json.dumps({"meta": meta, "results": results, **extra}, indent=1))
    png, md = Path(out).with_suffix(".png"), Path(out).with_suffix(".md")
    plot(results, png)
    md.write_text(f"`{command}` ({os.cpu_count()} cores)\n\n{table}\n")
    print(f"{table}\n\nwritten to {out}, {png} and {md}")
