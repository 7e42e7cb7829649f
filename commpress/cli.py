"""The ``commpress`` command."""
from __future__ import annotations

import argparse
import ast
import logging
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmark_list() -> str:
    """The benchmarks of a source checkout, each with its docstring's first line."""
    if not BENCHMARKS.is_dir():
        return "no benchmarks/ folder: benchmarks ship with a source checkout, not with a wheel"
    lines = ["benchmarks:"]
    for script in sorted(BENCHMARKS.glob("*.py")):
        doc = ast.get_docstring(ast.parse(script.read_text()))
        if doc and script.stem != "report":
            lines.append(f"  {script.stem:<18} {doc.splitlines()[0]}")
    return "\n".join(lines)


def _bench(args, rest):
    script = BENCHMARKS / f"{args.name}.py"
    if not script.exists():
        sys.exit(f"commpress bench: no benchmark {args.name!r} (expected {script}; benchmarks "
                 "ship with a source checkout, not with an installed wheel)")
    sys.argv = [str(script)] + rest
    runpy.run_path(str(script), run_name="__main__")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="commpress", description=__doc__)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"commpress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import train
    train_parser = sub.add_parser("train", help="compressed multi-process training against fp32, "
                                                "with a report", description=train.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=lambda args, rest: train.run(args) if not rest else
                              parser.error(f"unrecognized arguments: {' '.join(rest)}"))
    from . import netsim
    netsim_parser = sub.add_parser("netsim", help="a rate-limited network of namespaces on this "
                                                  "machine", description=netsim.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    netsim.add_arguments(netsim_parser)
    netsim_parser.set_defaults(func=lambda args, rest: sys.exit(netsim.main(args)))
    bench = sub.add_parser("bench", help="run a benchmark from benchmarks/ (extra args pass through)",
                           epilog=_benchmark_list(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("name", help="a benchmark from the list below")
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="passed to the benchmark (--help shows its own options)")
    bench.set_defaults(func=lambda args, rest: _bench(args, args.args + rest))
    args, rest = parser.parse_known_args(argv)
    args.func(args, rest)


if __name__ == "__main__":
    main()
