"""The `aiayn` command (also `python -m aiayn`)."""

import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="aiayn", description="aiayn: the Transformer on hand-written kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what this build contains (JSON)")
    bench = sub.add_parser("bench", help="benchmark aiayn's ops against PyTorch", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        import aiayn

        print(json.dumps(aiayn.build_info(), indent=2))
        return 0
    if args.command == "bench":
        from aiayn.bench.__main__ import main as bench_main

        return bench_main(list(args.rest) + rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
