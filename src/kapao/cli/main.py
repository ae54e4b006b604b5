"""`kapao <verb> ...`: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import importlib
import sys

from kapao.errors import KapaoError

# verb -> module under kapao.cli; each module has add_parser(subparsers) and run(args) -> int
VERBS: dict[str, str] = {
    "demo": "kapao.cli.demo",
    "info": "kapao.cli.info",
    "predict": "kapao.cli.predict",
    "val": "kapao.cli.val",
    "train": "kapao.cli.train",
    "synth": "kapao.cli.synth",
    "data": "kapao.cli.data",
    "convert": "kapao.cli.convert",
    "export": "kapao.cli.export",
    "benchmark": "kapao.cli.benchmark",
    "app": "kapao.cli.app",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kapao", description="KAPAO multi-person pose estimation")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module in VERBS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from kapao import __version__

        print(__version__)
        return 0
    if not args.verb:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(VERBS[args.verb]).run(args) or 0)
    except KapaoError as e:
        print(f"kapao {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kapao {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
