"""Peak memory and time of a training step of the base model (Table 3, a shared 37000-piece
vocabulary) on 4096-token batches: aiayn's Trainer (fused projection + loss, fused Adam) against the
same model built from nn.Transformer + nn.Embedding + the tied projection, driven by the same
Trainer with torch's unfused loss (issue 21's "peak memory of a base-model step").

    python -m aiayn.bench.train_memory [--config base] [--tokens 4096] [--steps 3] [--bf16]

Each engine runs in a fresh process (a process's peak RSS only grows): the model and its batches are
built, then ``--steps`` optimizer steps run. One line per engine: the median step time, the peak RSS
(ru_maxrss) and its growth over the RSS before the first step (activations, logits, gradients and
Adam's state: the step's own memory), then the ratios. Not a timed test: run it on a quiet machine.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from aiayn.errors import ArgumentParser


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pairs(tokens, vocab, seed=0):
    """Sentence pairs of 32 source + 32 target pieces (33 with BOS/EOS each side): ``tokens`` // 64
    of them, one token-budget batch per step."""
    import random

    rng = random.Random(seed)
    return [([rng.randrange(4, vocab) for _ in range(31)], [rng.randrange(4, vocab) for _ in range(31)])
            for _ in range(max(1, tokens // 64))]


def run_engine(engine, config, tokens, steps, bf16, vocab):
    """One engine in this process; returns its measurements as a dict."""
    import warnings

    import torch

    import aiayn
    from aiayn.bench.cases import _torch_transformer_model
    from aiayn.train.trainer import Trainer, TrainOptions

    cfg = aiayn.nn.TransformerConfig.preset(config, vocab)
    pairs = _pairs(tokens, vocab)
    options = TrainOptions(max_tokens=10**9, warmup=4000, seed=1, bf16=bf16)
    torch.manual_seed(0)
    if engine == "aiayn":
        trainer = Trainer(aiayn.nn.Transformer(cfg), pairs, options, "cpu")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _torch_transformer_model(cfg, "cpu")
        model.config = cfg
        trainer = Trainer(model, pairs, options, "cpu", fused_loss=False)
    before = _rss_mib()
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.MultiheadAttention's note on mixed mask types
        for _ in range(steps):
            start = time.perf_counter()
            result = trainer.train_step()
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"engine": engine, "seconds": statistics.median(times), "first_step_s": times[0],
            "peak_mib": peak, "growth_mib": peak - before, "before_mib": before, "tokens": result["tokens"],
            "parameters": params}


def main(argv=None):
    parser = ArgumentParser(prog="python -m aiayn.bench.train_memory",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="base", help="model preset (default base)")
    parser.add_argument("--vocab", type=int, default=37000, help="shared vocabulary size (default 37000)")
    parser.add_argument("--tokens", type=int, default=4096, help="source + target tokens per batch")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per engine (median time)")
    parser.add_argument("--bf16", action="store_true", help="aiayn with bf16 autocast (nn.Transformer stays float32)")
    parser.add_argument("--engine", choices=["aiayn", "nn.Transformer"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.tokens < 64 or args.vocab < 8:
        parser.error("--steps must be >= 1, --tokens >= 64 and --vocab >= 8")
    if args.engine:  # the child process of one engine
        print(json.dumps(run_engine(args.engine, args.config, args.tokens, args.steps,
                                    args.bf16 and args.engine == "aiayn", args.vocab)))
        return
    results = {}
    for engine in ("aiayn", "nn.Transformer"):
        cmd = [sys.executable, "-m", "aiayn.bench.train_memory", "--engine", engine, "--config", args.config,
               "--vocab", str(args.vocab), "--tokens", str(args.tokens), "--steps", str(args.steps)]
        out = subprocess.run(cmd + (["--bf16"] if args.bf16 else []), capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"train_memory: the {engine} run failed: {out.stderr.strip().splitlines()[-1:]}")
        r = results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        dtype = "bf16 autocast" if args.bf16 and engine == "aiayn" else "float32"
        print(f"{engine:>14} {dtype}: {r['seconds']:.2f} s/step (first {r['first_step_s']:.2f} s), peak RSS "
              f"{r['peak_mib']:.0f} MiB, growth over the step's start {r['growth_mib']:.0f} MiB "
              f"({args.config}, {r['parameters']} parameters, {r['tokens']} tokens per step)", flush=True)
    ours, theirs = results["aiayn"], results["nn.Transformer"]
    print(f"aiayn / nn.Transformer: {theirs['seconds'] / ours['seconds']:.2f}x faster, peak RSS "
          f"{ours['peak_mib'] / theirs['peak_mib']:.2f}x, step growth {ours['growth_mib'] / max(theirs['growth_mib'], 1):.2f}x")


if __name__ == "__main__":
    main()
