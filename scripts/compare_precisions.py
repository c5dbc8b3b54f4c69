#!/usr/bin/env python
"""Translation speed and BLEU of one checkpoint in several precisions, in one process: the
batches are timed interleaved (float32 batch i, int8 batch i, ...) so machine load hits both
alike, and each precision's whole output is scored with sacrebleu.

    python scripts/compare_precisions.py --checkpoint RUN_DIR --src val.de --ref val.en --sentences 200

Prints, per precision, sentences/s (total sentences / summed batch times) and BLEU.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiayn.translate import length_batches, load_translator, translate_ids  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--sentences", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--precisions", default="float32,int8")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import sacrebleu

    precisions = args.precisions.split(",")
    models = {}
    for prec in precisions:
        models[prec], vocab = load_translator(args.checkpoint, precision=prec)
    src = open(args.src, encoding="utf-8").read().splitlines()[:args.sentences]
    ref = open(args.ref, encoding="utf-8").read().splitlines()[:args.sentences]
    ids = [vocab.encode(line)[:models[precisions[0]].config.max_len - 1] for line in src]
    batches = length_batches([len(s) + 1 for s in ids], args.batch_size)
    for prec in precisions:  # warm-up: int8 packs its weights on first use
        translate_ids(models[prec], [ids[i] for i in batches[0]], beam=args.beam, batch_size=args.batch_size)
    seconds = dict.fromkeys(precisions, 0.0)
    hyps = {prec: [None] * len(ids) for prec in precisions}
    for k, batch in enumerate(batches):
        order = precisions if k % 2 == 0 else precisions[::-1]
        for prec in order:
            t0 = time.perf_counter()
            out = translate_ids(models[prec], [ids[i] for i in batch], beam=args.beam, batch_size=args.batch_size)
            seconds[prec] += time.perf_counter() - t0
            for i, h in zip(batch, out):
                hyps[prec][i] = h
    print(f"{len(ids)} sentences, batch {args.batch_size}, beam {args.beam}, {torch.get_num_threads()} threads")
    for prec in precisions:
        text = [vocab.decode(h) for h in hyps[prec]]
        bleu = sacrebleu.corpus_bleu(text, [ref])
        print(f"{prec:>8}: {len(ids) / seconds[prec]:6.2f} sentences/s ({seconds[prec]:.1f} s), BLEU {bleu.score:.2f}")
    if len(precisions) > 1:
        a, b = precisions[0], precisions[1]
        same = sum(x == y for x, y in zip(hyps[a], hyps[b]))
        print(f"identical outputs {a} / {b}: {same} of {len(ids)}")


if __name__ == "__main__":
    main()
