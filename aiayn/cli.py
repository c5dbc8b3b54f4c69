"""The `aiayn` command (also `python -m aiayn`): info, bench, demo, train, translate,
average-checkpoints. Mistakes in the user's input (files, checkpoints, options) end in one line on
stderr and exit status 2, never a traceback."""

import argparse
import json
import sys

from aiayn.errors import UserInputError


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser():
    parser = argparse.ArgumentParser(prog="aiayn", description="aiayn: the Transformer on hand-written kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what this build contains (JSON)")
    sub.add_parser("bench", help="benchmark aiayn's ops against PyTorch (aiayn bench --help)")

    demo = sub.add_parser("demo", help="train a small Transformer on a synthetic task on the CPU (~4 minutes on 2 cores)")
    demo.add_argument("--quick", action="store_true", help="a shorter run (what the tests use)")
    demo.add_argument("--task", default="copy", choices=["copy", "reverse", "sort"])
    demo.add_argument("--steps", type=_positive_int, help="optimizer steps (default: the plan's)")
    demo.add_argument("--out", default="aiayn-demo", help="folder for loss_curve.png, attention.png, log.json")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--beam", type=_positive_int, default=4)
    demo.add_argument("--no-progress", action="store_true")

    train = sub.add_parser("train", help="train on parallel text files (runs under torchrun too)")
    train.add_argument("--src", required=True, help="training source sentences, one per line")
    train.add_argument("--tgt", required=True, help="training target sentences, aligned with --src")
    train.add_argument("--valid-src", required=True)
    train.add_argument("--valid-tgt", required=True)
    train.add_argument("--config", default="base", choices=["base", "big", "tiny"])
    train.add_argument("--out", required=True, help="run directory: vocabulary, checkpoints, log, loss curve")
    train.add_argument("--max-tokens", type=_positive_int, default=25000,
                       help="padded source + target tokens per optimizer step over all ranks (paper: ~50000)")
    train.add_argument("--micro-tokens", type=_positive_int, default=None,
                       help="tokens per forward pass; less than a rank's share accumulates gradients")
    train.add_argument("--steps", type=_positive_int, default=100_000)
    train.add_argument("--warmup", type=_positive_int, default=4000)
    train.add_argument("--lr-scale", type=float, default=1.0, help="factor on the paper's learning rate")
    train.add_argument("--clip-norm", type=float, default=0.0, help="gradient-norm clipping (0 = off)")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast")
    train.add_argument("--dropout", type=float, default=None, help="override the preset's P_drop")
    train.add_argument("--seed", type=int, default=1)
    train.add_argument("--vocab-size", type=_positive_int, default=8000, help="paper: ~37000 shared BPE pieces")
    train.add_argument("--vocab-type", default="bpe", choices=["bpe", "unigram"])
    train.add_argument("--vocab", help="use this sentencepiece model instead of learning one")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.add_argument("--save-every", type=_positive_int, default=1000)
    train.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0 = all)")
    train.add_argument("--valid-every", type=_positive_int, default=1000)
    train.add_argument("--bleu-sentences", type=int, default=500, help="dev sentences decoded for BLEU (0 = none)")
    train.add_argument("--beam", type=_positive_int, default=4)
    train.add_argument("--alpha", type=float, default=0.6)
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument("--no-progress", action="store_true")

    tr = sub.add_parser("translate", help="translate stdin to stdout, line by line")
    tr.add_argument("--checkpoint", required=True,
                    help="run directory (its averaged model, else its newest checkpoint) or a .safetensors file")
    tr.add_argument("--vocab", help="sentencepiece model (default: vocab.model next to the checkpoint)")
    tr.add_argument("--beam", type=_positive_int, default=4)
    tr.add_argument("--alpha", type=float, default=0.6, help="length penalty (§6.1)")
    tr.add_argument("--max-len-offset", type=int, default=50, help="output length <= input length + this")
    tr.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])

    avg = sub.add_parser("average-checkpoints", help="average the newest N checkpoints of a run (§6.1)")
    avg.add_argument("dir", help="run directory")
    avg.add_argument("--last", type=_positive_int, default=5)
    avg.add_argument("--output", help="default: DIR/averaged.safetensors")
    return parser


def _train(args):
    from aiayn.train.run import RunArgs, run_training
    from aiayn.train.trainer import TrainOptions

    options = TrainOptions(max_tokens=args.max_tokens, micro_tokens=args.micro_tokens or 0, warmup=args.warmup,
                           lr_scale=args.lr_scale, clip_norm=args.clip_norm, bf16=args.bf16, seed=args.seed)
    run_training(RunArgs(
        src=args.src, tgt=args.tgt, valid_src=args.valid_src, valid_tgt=args.valid_tgt, out=args.out,
        config=args.config, steps=args.steps, options=options, vocab_size=args.vocab_size, vocab_type=args.vocab_type,
        vocab=args.vocab, resume=args.resume, save_every=args.save_every, keep_last=args.keep_last,
        valid_every=args.valid_every, bleu_sentences=args.bleu_sentences, beam=args.beam, alpha=args.alpha,
        device=args.device, dropout=args.dropout, progress=not args.no_progress))
    return 0


def _run(args):
    if args.command == "info":
        import aiayn

        print(json.dumps(aiayn.build_info(), indent=2))
    elif args.command == "demo":
        from aiayn.demo import run_demo

        run_demo(args.task, quick=args.quick, out_dir=args.out, steps=args.steps, seed=args.seed, beam=args.beam,
                 progress=not args.no_progress)
    elif args.command == "train":
        return _train(args)
    elif args.command == "translate":
        from aiayn.translate import load_translator, translate_lines

        model, vocab = load_translator(args.checkpoint, args.vocab, args.device)
        translate_lines(model, vocab, sys.stdin, sys.stdout, beam=args.beam, alpha=args.alpha,
                        max_len_offset=args.max_len_offset)
    elif args.command == "average-checkpoints":
        from aiayn.train.checkpoint import average_checkpoints

        path, steps = average_checkpoints(args.dir, args.last, args.output)
        print(f"averaged {len(steps)} checkpoints (steps {', '.join(map(str, steps))}) into {path}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the rest is the benchmark's own command line, passed on untouched
        from aiayn.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UserInputError as e:
        print(f"aiayn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
