#!/usr/bin/env python
"""A/B of aiayn builds (or of environment settings) on benchmark cases, for a noisy machine.

Each round runs every variant once, in its own subprocess, in alternating order; a run times
aiayn and torch interleaved on the named `aiayn bench` cases as `aiayn bench` does
(aiayn/bench/timing.py's time_interleaved, median of --samples) and reports
aiayn's time and its speed-up over torch measured in that same process. The table gives, per case
and variant, the median over the rounds. Compare the speed-ups, not the times: on a shared machine
only ratios measured side by side mean anything.

A variant is a folder holding an `aiayn` package (a copy of a build: `mkdir /tmp/vA && cp -r aiayn
/tmp/vA/`), optionally followed by environment settings, e.g.

    python scripts/bench_ab.py --cases feed_forward.fwd_small,attention.fwd.long \\
        --variant /tmp/vA --variant /tmp/vB --variant "/tmp/vB AIAYN_GEMM_DOT=0" --rounds 6
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


def run_cases(cases, dtype_name, samples):
    """In the variant's process: {case: (aiayn seconds, torch seconds / aiayn seconds)}."""
    import torch

    from aiayn.bench.cases import CASES
    from aiayn.bench.timing import time_interleaved

    dtype = getattr(torch, dtype_name)
    out = {}
    for name in cases:
        bench = CASES[name].make(torch.device("cpu"), dtype, False)
        ours, theirs = time_interleaved([bench.aiayn, bench.torch], device="cpu", repeats=samples)
        mo, mt = statistics.median(ours), statistics.median(theirs)
        out[name] = (mo, mt / mo)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="comma-separated `aiayn bench` case names")
    ap.add_argument("--variant", action="append", default=[],
                    help='"FOLDER [NAME=VALUE ...]": a folder with an aiayn package, and environment settings')
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--samples", type=int, default=21, help="timed samples per case and run")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = args.cases.split(",")
    if args.child:
        print(json.dumps(run_cases(cases, args.dtype, args.samples)))
        return
    if not args.variant:
        ap.error("give at least one --variant")

    results = {v: {c: [] for c in cases} for v in args.variant}
    for r in range(args.rounds):
        for variant in args.variant if r % 2 == 0 else args.variant[::-1]:
            folder, *settings = variant.split()
            env = dict(os.environ, PYTHONPATH=folder, **dict(s.split("=", 1) for s in settings))
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--cases", args.cases, "--dtype", args.dtype,
                   "--samples", str(args.samples)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
            if done.returncode != 0:
                sys.exit(f"variant {variant!r} failed:\n{done.stderr}")
            for case, (seconds, speedup) in json.loads(done.stdout.splitlines()[-1]).items():
                results[variant][case].append((seconds, speedup))

    width = max(len(v) for v in args.variant)
    for case in cases:
        print(case)
        for variant in args.variant:
            runs = results[variant][case]
            ms = statistics.median(s for s, _ in runs) * 1e3
            speedup = statistics.median(x for _, x in runs)
            print(f"  {variant:{width}s}  {ms:9.3f} ms  {speedup:6.3f}x  (rounds: "
                  f"{' '.join(f'{x:.2f}' for _, x in runs)})")


if __name__ == "__main__":
    main()
