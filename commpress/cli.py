"""The ``commpress`` command."""
from __future__ import annotations

import argparse
import logging
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


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
    bench = sub.add_parser("bench", help="run a benchmark from benchmarks/ (extra args pass through)")
    bench.add_argument("name", help="e.g. codec_throughput")
    bench.set_defaults(func=_bench)
    args, rest = parser.parse_known_args(argv)
    args.func(args, rest)


if __name__ == "__main__":
    main()
