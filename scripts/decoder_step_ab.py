#!/usr/bin/env python
"""The C++ decoder step against the Python layers, end to end: beam-search translation of the same
batches with `aiayn.nn.decoder_step.enabled(True)` and `(False)`, alternating batch by batch (the
order flips each round) in one process, so a noisy machine's drift hits both alike.

    python scripts/decoder_step_ab.py --checkpoint RUN_DIR --src val.de [--sentences 256]
        [--precision float32|bf16|int8] [--rounds 4]

Prints the total seconds of each and their ratio, and the median per-batch ratio.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiayn.nn import decoder_step  # noqa: E402
from aiayn.translate import load_translator, translate_ids  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--precision", default="float32", choices=["float32", "bf16", "int8", "int8_bf16"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    model, vocab = load_translator(a.checkpoint, precision=a.precision)
    lines = open(a.src, encoding="utf-8").read().splitlines()[:a.sentences]
    ids = [vocab.encode(line)[:model.config.max_len - 1] for line in lines]
    batches = [ids[i:i + a.batch_size] for i in range(0, len(ids), a.batch_size)]
    translate_ids(model, batches[0], beam=4, batch_size=a.batch_size)  # warm-up: packing, allocations
    total = {True: 0.0, False: 0.0}
    ratios = []
    for r in range(a.rounds):
        for batch in batches:
            took = {}
            for mode in ((True, False) if r % 2 == 0 else (False, True)):
                with decoder_step.enabled(mode):
                    start = time.perf_counter()
                    translate_ids(model, batch, beam=4, batch_size=a.batch_size)
                    took[mode] = time.perf_counter() - start
                total[mode] += took[mode]
            ratios.append(took[False] / took[True])
    print(f"{a.precision}: Python layers {total[False]:.2f} s, C++ step {total[True]:.2f} s, ratio "
          f"{total[False] / total[True]:.3f} (median per batch {statistics.median(ratios):.3f}; "
          f"{len(ids)} sentences x {a.rounds} rounds, beam 4)")


if __name__ == "__main__":
    main()
