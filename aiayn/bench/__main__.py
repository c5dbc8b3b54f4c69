"""The benchmark CLI: ``python -m aiayn.bench`` or ``aiayn bench``.

    python -m aiayn.bench                        # every case, on the CPU
    python -m aiayn.bench --quick --filter layer_norm --json out.json --plot speedups.png
    aiayn bench --filter translate --checkpoint run/ --src val.de --sentences 500
"""

import importlib.util
import json
import os
import sys

import torch

import aiayn
from aiayn.errors import ArgumentParser

from . import peak, run, select

_COLUMNS = [("case", "<"), ("shape", "<"), ("dtype", "<"), ("device", "<"), ("aiayn ms", ">"), ("torch ms", ">"),
            ("speed-up", ">"), ("GFLOP/s", ">"), ("GB/s", ">"), ("% peak", ">")]


def parse_args(argv):
    p = ArgumentParser(prog="aiayn bench", description=(
        "Time aiayn's ops against their PyTorch equivalents, interleaved, in one process. The median of "
        "--repeats samples is reported; GFLOP/s, GB/s and % of the measured machine peak are aiayn's."))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--filter", metavar="NAME", help="only the cases whose name contains NAME or matches it as a regex")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter samples (a smoke run)")
    p.add_argument("--repeats", type=int, metavar="N", help="timed samples per op (default 25, 5 with --quick)")
    p.add_argument("--json", metavar="PATH", help="write the results, peaks and build info as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the speed-ups (needs matplotlib)")
    p.add_argument("--remeasure", action="store_true", help="measure the machine peaks again instead of the cache")
    tr = p.add_argument_group("translate cases (engines racing on one set of sentences: aiayn float32 / bf16 / int8, "
                              "CTranslate2 float32 / int8 on the exported weights)")
    tr.add_argument("--checkpoint", metavar="PATH", default=os.environ.get("AIAYN_BENCH_CHECKPOINT"),
                    help="a trained model (a .safetensors file or a run directory, with its vocab.model) for "
                         "translate.beam4.multi30k instead of random weights (env AIAYN_BENCH_CHECKPOINT)")
    tr.add_argument("--src", metavar="FILE", default=os.environ.get("AIAYN_BENCH_SRC"),
                    help="source sentences for --checkpoint, one per line (env AIAYN_BENCH_SRC)")
    tr.add_argument("--sentences", type=int, metavar="N", help="only the first N lines of --src")
    args = p.parse_args(argv)
    if bool(args.checkpoint) != bool(args.src):
        p.error("--checkpoint and --src go together: the translate case needs the model and the text to translate")
    if args.sentences is not None and args.sentences < 1:
        p.error("--sentences must be at least 1")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: no CUDA device is available (torch {torch.__version__}, built with CUDA "
                f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib, which is not installed: pip install matplotlib")
    return p, args


def _engine_lines(r):
    """A translate case: a line saying what was translated, then a row per engine."""
    if r["status"] != "ok":
        return [f"{r['name']}: {r['status']}: {r['error']}"]
    lines = [f"{r['name']}: {r['setting']}; beam 4, alpha 0.6, length-sorted batches of 32, "
             f"{r['passes']} timed pass{'es' if r['passes'] > 1 else ''} (median)",
             f"  {'engine':<20}  {'sentences/s':>11}  {'tokens/s':>9}  {'s/pass':>8}  same as {r['reference']}"]
    for e in r["engines"]:
        if e["status"] != "ok":
            lines.append(f"  {e['engine']:<20}  {e['note']}")
            continue
        agree = f"{100 * e['agreement']:.1f}%" if "agreement" in e else "-"
        lines.append(f"  {e['engine']:<20}  {e['sentences_per_s']:>11.1f}  {e['tokens_per_s']:>9.0f}  "
                     f"{e['seconds']:>8.2f}  {agree}")
    lines += [f"  note: {note}" for note in r.get("notes", [])]
    return lines


def _print_result(table, r):
    if r.get("kind") == "engines" or (r["status"] != "ok" and r.get("baseline") == "engines"):
        print("\n" + "\n".join(_engine_lines(r)) + "\n", flush=True)
    else:
        table.line(_row(r))


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _row(r):
    if r["status"] != "ok":
        return [r["name"], "x".join(map(str, r.get("shape", []))) or "-", r["dtype"], r["device"],
                f"{r['status']}: {r['error']}"[:80]]
    pct = f"{r['pct_peak']:.0f}% {r['peak_kind']}" if "pct_peak" in r else "-"
    return [r.get("label", r["name"]), "x".join(map(str, r["shape"])), r["dtype"], r["device"],
            f"{r['aiayn_ms']:.3f}", f"{r['torch_ms']:.3f}", f"{r['speedup']:.2f}x", _fmt(r.get("gflops"), ".1f"), _fmt(r.get("gbps"), ".1f"), pct]


class _Table:
    """Prints rows as they come, in columns wide enough for the case names."""

    def __init__(self, name_width):
        self.widths = [max(4, name_width), 10, 8, 6, 9, 9, 8, 8, 7, 16]

    def line(self, cells):
        """A full row, or (a skipped or failed case) the first cells and then a message as is."""
        fixed = cells if len(cells) == len(self.widths) else cells[:-1]
        out = [f"{cell:{align}{width}}" for cell, width, (_, align) in zip(fixed, self.widths, _COLUMNS)]
        print("  ".join(out + cells[len(fixed):]).rstrip(), flush=True)

    def header(self):
        self.line([name for name, _ in _COLUMNS])
        print("  ".join("-" * w for w in self.widths), flush=True)


def _describe(peaks):
    m = peaks["machine"]
    where = f"{m['name']}, {m['threads']} threads, CPU ISA {m['cpu_isa']}" if m["device"] == "cpu" else m["name"]
    if m.get("bf16"):
        where += f", bf16 on {m['bf16']}"
    # "bfloat16" is the peak of the instruction bf16 runs on (bfloat16_amx or bfloat16_dot, in the JSON).
    flops = ", ".join(f"{dtype} {f / 1e9:.0f} GFLOP/s" for dtype, f in peaks["flops"].items() if f and "_" not in dtype)
    how = f"cached in {peaks['cache']}" if peaks["cached"] else f"measured in {peaks['seconds']:.1f} s, cached in {peaks['cache']}"
    if peaks.get("corrected_from"):
        how += (f"; measured again: a probe beat the cached float32 peak of "
                f"{peaks['corrected_from'] / 1e9:.0f} GFLOP/s")
    text = (f"aiayn {aiayn.__version__}, torch {torch.__version__} on {where}\n"
            f"peaks: {flops}, memory {peaks['bandwidth'] / 1e9:.1f} GB/s ({how}; --remeasure to redo)")
    if peaks.get("warning"):
        text += f"\nwarning: {peaks['warning']}"
    return text


def plot(results, path):
    from matplotlib.figure import Figure  # lazily: matplotlib is an optional extra (aiayn[plot])

    ok = [r for r in results if r["status"] == "ok" and "speedup" in r]  # translate cases have no speed-up
    labels = [f"{r.get('label', r['name'])}\n{r['dtype']} {r['device']}" for r in ok]
    speedups = [r["speedup"] for r in ok]
    fig = Figure(figsize=(8, 1 + 0.6 * max(1, len(ok))), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(labels, speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.bar_label(bars, labels=[f"{s:.2f}x" for s in speedups], padding=3)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over PyTorch (torch time / aiayn time)")
    ax.set_title(f"aiayn {aiayn.__version__} vs torch {torch.__version__}")
    ax.margins(x=0.15)
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser, args = parse_args(argv)
    from .cases import TRANSLATE_INPUT

    for option, path in (("--checkpoint", args.checkpoint), ("--src", args.src)):
        if path and not os.path.exists(path):
            parser.error(f"{option} {path!r} does not exist")
    TRANSLATE_INPUT.update(checkpoint=args.checkpoint, src=args.src, sentences=args.sentences)
    cases = select(args.filter, args.device)
    if args.list:
        listed = select(args.filter)
        width = max((len(c.name) for c in listed), default=0)
        for case in listed:
            dtypes = ", ".join(str(d).removeprefix("torch.") for d in case.dtypes)
            print(f"{case.name:<{width}}  {dtypes:<20}  on {', '.join(case.devices)}")
        return 0
    if not cases:
        parser.error(f"no case matches --filter {args.filter!r} on {args.device} (--list shows them)")
    repeats = args.repeats or (5 if args.quick else 25)
    timing = dict(warmup=2, min_sample_s=0.005) if args.quick else dict(warmup=5, min_sample_s=0.02)

    ops = [c for c in cases if c.baseline != "engines"]  # translate cases print their own rows
    table = _Table(max((len(c.label) for c in ops), default=4))
    peaks = peak.peaks(args.device, remeasure=args.remeasure)
    print(_describe(peaks), flush=True)
    if ops:
        print(f"median of {repeats} interleaved samples per op\n")
        table.header()
    results = run(cases, args.device, peaks=peaks, repeats=repeats, quick=args.quick,
                         on_result=lambda r: _print_result(table, r), **timing)
    for name, old in (peaks.get("raised") or {}).items():
        print(f"\nThe cached {name} peak ({_fmt(old and old / 1e9, '.0f')} GFLOP/s) was below what a case reached, so "
              f"it was measured on a busy machine: raised to {peaks['flops'][name] / 1e9:.0f} GFLOP/s in the cache "
              "(the % peak column uses the raised value from that case on; rerun for a consistent table).")
    if any(r.get("peak_kind") == "bandwidth" and r["pct_peak"] > 100 for r in results):
        print("\n% bandwidth is of the memory (DRAM) copy bandwidth: a working set that stays in cache can beat it.")
    for r in results:
        if r["status"] == "error":
            print(f"\n{r['name']} [{r['dtype']}]: {r['error']}", file=sys.stderr)

    if args.json:
        report = {"build_info": aiayn.build_info(), "torch_version": torch.__version__, "device": args.device,
                  "peaks": peaks, "settings": {"repeats": repeats, "quick": args.quick, **timing},
                  "results": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
