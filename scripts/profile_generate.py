#!/usr/bin/env python
"""Where beam-search translation's time goes (issue 22): `aiayn translate`'s batched beam search
over a trained checkpoint under torch.profiler, ops grouped by what they are.

    python scripts/profile_generate.py --checkpoint RUN_DIR --src ../shared/data/multi30k/val.de --sentences 256

Prints sentences/s and one table: milliseconds per batch and share, by category (the vocabulary
projection, log-softmax + top-k, KV-cache reorders, the decoder's GEMMs and attention, Python).
"""

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiayn.translate import load_translator, translate_ids  # noqa: E402


def category(name, shapes, vocab):
    n = name.lower()
    if ("linear" in n or n in ("aten::mm", "aten::addmm")) and any(vocab in s for s in shapes if s):
        return "vocab projection"
    if "linear" in n or "feed_forward" in n or n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
        return "GEMMs (linear, FFN)"
    if "attention" in n:
        return "attention"
    if "layer_norm" in n:
        return "layer norm"
    if "log_softmax" in n or "topk" in n or "sort" in n:
        return "log-softmax + top-k"
    if "index_select" in n or "index_copy" in n or "gather" in n or n == "aten::cat":
        return "KV-cache reorders, token concatenation"
    return "other ops"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--quantize", choices=["bf16", "int8", "int8_bf16"])
    p.add_argument("--top", type=int, default=0, help="also list the N ops with the most self time")
    args = p.parse_args(argv)

    model, vocab = load_translator(args.checkpoint, precision=args.quantize or "float32")
    lines = open(args.src, encoding="utf-8").read().splitlines()[:args.sentences]
    ids = [vocab.encode(line)[:model.config.max_len - 1] for line in lines]
    translate_ids(model, ids[:args.batch_size], beam=args.beam, batch_size=args.batch_size)  # warm-up, packing
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        hyps = translate_ids(model, ids, beam=args.beam, batch_size=args.batch_size)
        wall = time.perf_counter() - t0
    V = model.config.tgt_vocab_size
    totals = defaultdict(float)
    by_op = defaultdict(lambda: [0.0, 0])
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    main_thread = max(set(e.thread for e in events),
                      key=lambda t: sum(e.self_cpu_time_total for e in events if e.thread == t))
    for e in events:
        if e.thread == main_thread:
            shapes = [tuple(s) for s in (e.input_shapes or []) if isinstance(s, (list, tuple))]
            totals[category(e.name, shapes, V)] += e.self_cpu_time_total / 1e3
            by_op[e.name][0] += e.self_cpu_time_total / 1e3
            by_op[e.name][1] += 1
    totals["Python (beam bookkeeping), dispatch"] = max(0.0, wall * 1e3 - sum(totals.values()))
    batches = -(-len(ids) // args.batch_size)
    tokens = sum(len(h) + 1 for h in hyps)
    print(f"{len(ids)} sentences, batch {args.batch_size} x beam {args.beam}, vocab {V}, "
          f"{model.config.num_layers} layers, d_model {model.config.d_model}, {args.quantize or 'float32'}, "
          f"{torch.get_num_threads()} threads: {len(ids) / wall:.1f} sentences/s, {tokens / wall:.0f} tokens/s "
          "(profiled)")
    print(f"{'category':<44} {'ms/batch':>9} {'share':>6}")
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{cat:<44} {ms / batches:9.1f} {ms / (wall * 1e3):6.1%}")
    if args.top:
        print(f"\n{'op (self time)':<44} {'ms/batch':>9} {'calls/batch':>11}")
        for name, (ms, calls) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"{name[:44]:<44} {ms / batches:9.1f} {calls / batches:11.0f}")


if __name__ == "__main__":
    main()
