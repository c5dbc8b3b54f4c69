#!/usr/bin/env python
"""Where a training step's time goes (issue 21): aiayn's Trainer on real batches, or the same model
built from nn.Transformer (--baseline), under torch.profiler; ops grouped by what they are.

    python scripts/profile_train.py --data ../shared/data/multi30k --preset small --steps 20
    python scripts/profile_train.py --data ../shared/data/multi30k --preset base --vocab-size 37000 --synthetic-vocab

--data is a folder with train.de / train.en (Multi30k's layout); the vocabulary is learned once and
cached in --work. --synthetic-vocab keeps the corpus's sentence lengths but draws token ids from the
whole vocabulary (for a 37000-piece base model on a corpus too small to learn that many pieces).
Prints one table: milliseconds per step and share of the step, by category, and the GEMMs by shape.
"""

import argparse
import os
import random
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import aiayn  # noqa: E402
from aiayn.data import Vocabulary  # noqa: E402
from aiayn.nn import Transformer, TransformerConfig  # noqa: E402
from aiayn.train.batching import collate, pair_lengths, token_batches  # noqa: E402
from aiayn.train.trainer import Trainer, TrainOptions  # noqa: E402

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")


def category(name, shapes, vocab):
    """What an op event is. aiayn's ops show as their own name (backward kernels) or as
    GeneratedBackwardFor_aiayn_<op>_fwd_default (the autograd wrapper, where the forward runs)."""
    n = name.lower()
    if "linear_cross_entropy" in n:
        return "vocab projection + loss (fused op)"
    if name in GEMM_OPS or "aiayn::linear" in n or "aiayn_linear" in n or "feed_forward" in n:
        if any(vocab in s for s in shapes if s):
            return "vocab projection GEMMs"
        return "GEMMs (linear, FFN)"
    if "attention" in n or "scaled_dot_product" in n or "multi_head" in n or ("softmax" in n and "log" not in n):
        return "attention"
    if "layer_norm" in n:
        return "layer norm (+ residual, dropout)"
    if "embedding" in n or "index_select" in n or "index_add" in n:
        return "embedding lookup / backward"
    if "log_softmax" in n or "nll_loss" in n or "cross_entropy" in n or "gather" in n:
        return "loss (log-softmax, NLL)"
    return "other ops (elementwise, copies, dropout, masks)"


def load_pairs(args):
    lines_src = open(os.path.join(args.data, "train.de"), encoding="utf-8").read().splitlines()
    lines_tgt = open(os.path.join(args.data, "train.en"), encoding="utf-8").read().splitlines()
    os.makedirs(args.work, exist_ok=True)
    prefix = os.path.join(args.work, f"vocab{args.vocab_size if not args.synthetic_vocab else 8000}")
    if not os.path.exists(prefix + ".model"):
        Vocabulary.train([os.path.join(args.data, "train.de"), os.path.join(args.data, "train.en")], prefix,
                         8000 if args.synthetic_vocab else args.vocab_size, "bpe")
    vocab = Vocabulary(prefix + ".model")
    pairs = [(vocab.encode(s), vocab.encode(t)) for s, t in zip(lines_src, lines_tgt)]
    if args.synthetic_vocab:
        rng = random.Random(0)
        pairs = [([rng.randrange(4, args.vocab_size) for _ in s], [rng.randrange(4, args.vocab_size) for _ in t])
                 for s, t in pairs]
        return pairs, args.vocab_size
    return pairs, len(vocab)


def baseline_model(cfg):
    """nn.Transformer + nn.Embedding + the tied projection, as the benchmark builds it."""
    from aiayn.bench.cases import _torch_transformer_model

    model = _torch_transformer_model(cfg, "cpu")
    model.config = cfg
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--work", default="/tmp/aiayn-profile")
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--synthetic-vocab", action="store_true")
    p.add_argument("--max-tokens", type=int, default=2500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--baseline", action="store_true", help="the nn.Transformer model instead of aiayn's")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--top-gemms", type=int, default=8)
    p.add_argument("--top-ops", type=int, default=0, help="also list the N ops with the most self time")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    pairs, vocab = load_pairs(args)
    overrides = {"num_layers": args.layers} if args.layers else {}
    if args.preset == "small" and "small" not in aiayn.nn.PRESETS:
        cfg = TransformerConfig.preset("base", vocab, num_layers=3, d_model=256, d_ff=1024, num_heads=4, **overrides)
    else:
        cfg = TransformerConfig.preset(args.preset, vocab, **overrides)
    model = baseline_model(cfg) if args.baseline else Transformer(cfg)
    trainer = Trainer(model, pairs, TrainOptions(max_tokens=args.max_tokens, warmup=400, bf16=args.bf16), "cpu")

    lengths = pair_lengths(pairs)
    plan = token_batches(lengths, args.max_tokens, seed=1)
    real = padded = 0
    for batch in plan:
        src, tgt_in, _ = collate([pairs[i] for i in batch], 0, 1, 2)
        real += sum(lengths[i][0] + lengths[i][1] for i in batch)
        padded += src.numel() + tgt_in.numel()

    for _ in range(args.warmup_steps):
        trainer.train_step()
    tokens = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tokens += trainer.train_step()["tokens"]
        wall = time.perf_counter() - t0

    # Self time of each op event on the main thread, by category; the optimizer's ops by ancestry.
    totals, gemms, by_op = defaultdict(float), defaultdict(lambda: [0.0, 0]), defaultdict(float)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    main_thread = max(set(e.thread for e in events), key=lambda t: sum(e.self_cpu_time_total for e in events
                                                                         if e.thread == t))
    for e in events:
        if e.thread != main_thread:
            continue
        top = e
        while top.cpu_parent is not None:
            top = top.cpu_parent
        shapes = [tuple(s) for s in (e.input_shapes or []) if isinstance(s, (list, tuple))]
        if top.name.startswith("Optimizer."):
            cat = "optimizer (Adam)"
        else:
            cat = category(e.name, shapes, vocab)
        totals[cat] += e.self_cpu_time_total / 1e3
        by_op[(e.name, cat)] += e.self_cpu_time_total / 1e3
        if cat.startswith(("GEMMs", "vocab projection GEMMs")) and e.self_cpu_time_total > 0:
            key = (e.name, " x ".join("x".join(map(str, s)) for s in shapes if s))
            gemms[key][0] += e.self_cpu_time_total / 1e3
            gemms[key][1] += 1
    ops_ms = sum(totals.values())
    wall_ms = wall * 1e3
    totals["Python, dispatch, autograd engine (step - ops)"] = max(0.0, wall_ms - ops_ms)

    who = "nn.Transformer baseline" if args.baseline else "aiayn"
    print(f"{who}: preset {args.preset} (layers {cfg.num_layers}, d_model {cfg.d_model}, d_ff {cfg.d_ff}, heads "
          f"{cfg.num_heads}), vocab {vocab}, {args.max_tokens}-token batches{', bf16' if args.bf16 else ''}, "
          f"{torch.get_num_threads()} threads, {aiayn._C.cpu_isa()}")
    print(f"{args.steps} steps: {wall_ms / args.steps:.1f} ms/step, {tokens / wall:.0f} tokens/s (profiled; the "
          f"profiler adds some overhead); padding: {padded / real - 1:.1%} of the real tokens")
    print(f"{'category':<52} {'ms/step':>8} {'share':>6}")
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{cat:<52} {ms / args.steps:8.2f} {ms / wall_ms:6.1%}")
    if args.top_ops:
        print(f"\nops by self time (top {args.top_ops}):")
        for (name, cat), ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top_ops]:
            print(f"  {ms / args.steps:7.2f} ms/step  {name}  [{cat}]")
    print(f"\nGEMMs by op and input shapes (top {args.top_gemms}):")
    for (name, shape), (ms, count) in sorted(gemms.items(), key=lambda kv: -kv[1][0])[:args.top_gemms]:
        print(f"  {ms / args.steps:7.2f} ms/step  {count // args.steps:3d}x  {name}  {shape}")


if __name__ == "__main__":
    main()
