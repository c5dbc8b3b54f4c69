"""The `aiayn` command (also `python -m aiayn`)."""

import argparse
import json
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the rest is the benchmark's own command line, passed on untouched
        from aiayn.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="aiayn", description="aiayn: the Transformer on hand-written kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what this build contains (JSON)")
    sub.add_parser("bench", help="benchmark aiayn's ops against PyTorch (aiayn bench --help)")
    args = parser.parse_args(argv)
    if args.command == "info":
        import aiayn

        print(json.dumps(aiayn.build_info(), indent=2))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
