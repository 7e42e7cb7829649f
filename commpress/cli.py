"""The ``commpress`` command."""
from __future__ import annotations

import argparse
import ast
import importlib
import logging
import runpy
import sys
import warnings
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
#: the API reference's modules (listed: ``commpress.__all__`` hides submodules from pdoc), and
#: those that need an optional dependency
API_MODULES = ["commpress", "commpress.ddp", "commpress.config", "commpress.codecs",
               "commpress.comm", "commpress.acdc", "commpress.feedback", "commpress.stats",
               "commpress.train", "commpress.netsim"]
OPTIONAL_API_MODULES = ["commpress.mpi", "commpress.horovod", "commpress.lightning"]


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
    try:
        runpy.run_path(str(script), run_name="__main__")
    except ModuleNotFoundError as exc:
        if exc.name not in ("matplotlib", "sklearn"):
            raise
        sys.exit(f"commpress bench: the benchmarks need {exc.name}: pip install -e '.[bench]'")


def _docs(args, rest):
    """The HTML API reference from the docstrings, with pdoc; any warning (a docstring or
    signature pdoc cannot read) fails the build, so the reference cannot rot silently."""
    if rest:
        sys.exit(f"commpress docs: unrecognized arguments: {' '.join(rest)}")
    try:
        import pdoc
        import pdoc.render
    except ImportError:
        sys.exit("commpress docs needs pdoc: pip install -e '.[docs]'")
    modules = list(API_MODULES)
    for name in OPTIONAL_API_MODULES:
        try:
            importlib.import_module(name)
            modules.append(name)
        except ImportError as exc:
            print(f"commpress docs: leaving out {name}: {exc}", file=sys.stderr)
    pdoc.render.configure(docformat="google", footer_text=f"commpress {args.version}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pdoc.pdoc(*modules, output_directory=Path(args.out))
    print(f"API reference of {len(modules)} modules in {args.out}/index.html")


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
    docs = sub.add_parser("docs", help="build the HTML API reference (needs the docs extra)")
    docs.add_argument("--out", default="build/api", help="output folder (default build/api)")
    docs.set_defaults(func=_docs, version=__version__)
    args, rest = parser.parse_known_args(argv)
    args.func(args, rest)


if __name__ == "__main__":
    main()
