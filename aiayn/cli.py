"""The `aiayn` command (also `python -m aiayn`): info, bench, demo, train, translate, evaluate,
average-checkpoints, export. Mistakes in the user's input (files, checkpoints, options) end in one line on
stderr and exit status 2, never a traceback."""

import argparse
import dataclasses
import json
import sys

from aiayn.errors import ArgumentParser, UserInputError
from aiayn.quantization import MODES as QUANTIZE_MODES


BEAM_STOP_HELP = ("when a sentence's beam search stops: count (default; fairseq's rule) once --beam hypotheses "
                  "have ended; bound: once no live hypothesis can still beat the best ended one (its score over "
                  "the largest length penalty ahead): never a lower score, a little slower")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


CHECKPOINT_HELP = ("a .safetensors file, or a run directory: its averaged.safetensors if present (aiayn "
                   "average-checkpoints), else its best.safetensors (best dev BLEU, or dev loss without BLEU), "
                   "else its newest checkpoint_<step>.safetensors")


def _add_train_parser(sub):
    from aiayn.nn.config import PRESETS
    from aiayn.train.config_file import TrainSettings

    d = TrainSettings()
    presets = "|".join(sorted(PRESETS))
    train = sub.add_parser(
        "train", help="train on parallel text files (runs under torchrun too)",
        description="Train a Transformer on parallel text files. Settings come from a preset, overridden by a "
                    "config file (--config FILE.json|FILE.toml: keys preset, [model] TransformerConfig fields, "
                    "[train] these options with underscores), overridden by the flags below. The run directory "
                    "collects vocab.model, run.json, checkpoint_<step>.safetensors + .state.pt, best.safetensors + "
                    "best.json, log.json, loss_curve.png and bleu_curve.png.")
    files = train.add_argument_group("files")
    files.add_argument("--src", help="training source sentences, one per line (with --resume: the run's)")
    files.add_argument("--tgt", help="training target sentences, aligned with --src")
    files.add_argument("--valid-src", help="dev source sentences (validation: loss, perplexity, BLEU)")
    files.add_argument("--valid-tgt", help="dev target sentences")
    files.add_argument("--out", required=True, help="run directory")
    files.add_argument("--vocab", help="use this sentencepiece model instead of learning one")
    files.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in --out, exactly (same losses as a run never "
                            "stopped). Model flags must match the run's and can be left out, as can the files; "
                            "every other setting (limits included) defaults to the run's (run.json), so raise "
                            "--steps / --max-epochs / --max-time to go on after a stop")

    model = train.add_argument_group("model (over the preset and the config file)")
    model.add_argument("--config", metavar="PRESET|FILE",
                       help=f"a preset ({presets}; default base, or the resumed run's config) or a .json / .toml "
                            "config file")
    model.add_argument("--preset", choices=sorted(PRESETS), help="the preset, also when --config names a file")
    model.add_argument("--layers", type=int, help="encoder and decoder layers each (N)")
    model.add_argument("--d-model", type=int)
    model.add_argument("--d-ff", type=int)
    model.add_argument("--heads", type=int, help="attention heads (h); must divide --d-model")
    model.add_argument("--dropout", type=float, help="P_drop (§5.4)")
    model.add_argument("--attention-dropout", type=float, help="dropout on attention probabilities")
    model.add_argument("--ffn-dropout", type=float, help="dropout on the feed-forward hidden activation")
    model.add_argument("--label-smoothing", type=float, help="epsilon_ls (§5.4)")
    model.add_argument("--norm-first", action=argparse.BooleanOptionalAction, help="pre-LN instead of post-LN")
    model.add_argument("--share-embeddings", action=argparse.BooleanOptionalAction,
                       help="one embedding matrix for source, target and output (default: on)")
    model.add_argument("--max-len", type=int, help="longest sentence in tokens (longer training pairs are dropped)")
    model.add_argument("--layer-norm-eps", type=float)

    stop = train.add_argument_group("how long (the first limit reached stops the run, with a checkpoint)")
    stop.add_argument("--steps", type=int, help=f"optimizer steps in all (default {d.steps})")
    stop.add_argument("--max-epochs", type=int, help="passes over the training pairs in all")
    stop.add_argument("--max-time", type=float, metavar="MINUTES",
                      help="minutes of training in all: the wall-clock time of the training loop (steps, "
                           "validation, checkpoints), summed over --resume; vocabulary learning and data "
                           "loading do not count")
    stop.add_argument("--early-stop", type=int, metavar="PATIENCE",
                      help="stop after PATIENCE validations without a new best")

    opt = train.add_argument_group("training (a resumed run keeps its own)")
    opt.add_argument("--max-tokens", type=int,
                     help=f"padded source + target tokens per optimizer step over all ranks (default {d.max_tokens}; "
                          "paper: ~50000)")
    opt.add_argument("--micro-tokens", type=int,
                     help="tokens per forward pass; less than a rank's share accumulates gradients")
    opt.add_argument("--warmup", type=int, help=f"warm-up steps (default {d.warmup})")
    opt.add_argument("--lr-scale", type=float, help="factor on the paper's learning rate (default 1)")
    opt.add_argument("--clip-norm", type=float, help="gradient-norm clipping (default 0 = off)")
    opt.add_argument("--bf16", action="store_const", const=True, help="bf16 autocast")
    opt.add_argument("--seed", type=int, help=f"default {d.seed}")
    opt.add_argument("--vocab-size", type=int, help=f"shared vocabulary pieces (default {d.vocab_size}; paper ~37000)")
    opt.add_argument("--vocab-type", choices=["bpe", "unigram"], help="default bpe")

    val = train.add_argument_group("validation and checkpoints")
    val.add_argument("--valid-every", type=int,
                     help=f"validate every N steps (default {d.valid_every}; 0 = only by epoch and at the end); "
                          "one line each: step, epoch, elapsed, tokens/s, dev loss, perplexity, BLEU")
    val.add_argument("--valid-every-epoch", action="store_const", const=True, help="also validate at each epoch's end")
    val.add_argument("--bleu-sentences", type=int,
                     help=f"dev sentences decoded for BLEU (default {d.bleu_sentences}; 0 = none: the best "
                          "checkpoint is then chosen by dev loss)")
    val.add_argument("--beam", type=int, help=f"beam size for dev BLEU (default {d.beam})")
    val.add_argument("--alpha", type=float, help=f"length penalty for dev BLEU (default {d.alpha})")
    val.add_argument("--save-every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    val.add_argument("--keep-last", type=int, help="keep only the newest N checkpoints (default 0 = all)")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument("--no-progress", action="store_true")


def _parser():
    parser = ArgumentParser(prog="aiayn", description="aiayn: the Transformer on hand-written kernels")
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

    _add_train_parser(sub)

    tr = sub.add_parser(
        "translate", help="translate a file or stdin, one line each",
        description="Translate text, one sentence per line, into one translation per line in input order. "
                    "Lines are read in chunks (16 batches), sorted by length into batches, translated with beam "
                    "search and written back in order; an interactive terminal is translated line by line. The "
                    "last line on stderr gives sentences and target tokens per second.")
    tr.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    tr.add_argument("--vocab", help="sentencepiece model (default: vocab.model next to the checkpoint)")
    tr.add_argument("--input", "-i", help="source file (default: standard input)")
    tr.add_argument("--output", "-o", help="translations file (default: standard output)")
    tr.add_argument("--beam", type=_positive_int, default=4)
    tr.add_argument("--alpha", type=float, default=0.6, help="length penalty (§6.1)")
    tr.add_argument("--max-len-offset", type=int, default=50, help="output length <= input length + this")
    tr.add_argument("--beam-stop", choices=["count", "bound"], default="count", help=BEAM_STOP_HELP)
    tr.add_argument("--batch-size", type=_positive_int, default=32, help="sentences per beam search (default 32)")
    tr.add_argument("--max-tokens", type=_positive_int,
                    help="also cap each batch at this many padded source tokens")
    tr.add_argument("--quantize", choices=QUANTIZE_MODES,
                    help="bf16: weights, activations and key/value caches in bfloat16 (float32 softmax and "
                         "LayerNorm statistics); fast on CPUs with AVX-512-BF16 or AMX. int8 (CPU only): "
                         "int8 weights per output channel and activations per row in every linear layer, "
                         "int32 accumulation (AVX-512 VNNI / AVX2); attention and LayerNorm stay float32. "
                         "int8_bf16 (CPU only): int8's linear layers with attention and its key/value caches "
                         "in bfloat16 (the fastest on AVX-512-BF16 / AMX CPUs)")
    tr.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's, all cores)")
    tr.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    tr.add_argument("--no-progress", action="store_true", help="no progress bar (shown on stderr for --input files)")
    tr.add_argument("--quiet", "-q", action="store_true", help="no speed line on stderr")

    ev = sub.add_parser("evaluate", help="translate a test set and score it: BLEU and chrF (sacrebleu, with signatures)")
    ev.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    ev.add_argument("--src", required=True, help="source sentences, one per line")
    ev.add_argument("--ref", required=True, help="reference translations, aligned with --src")
    ev.add_argument("--output", help="write the translations here, one per line in input order")
    ev.add_argument("--vocab", help="sentencepiece model (default: vocab.model next to the checkpoint)")
    ev.add_argument("--beam", type=_positive_int, default=4)
    ev.add_argument("--alpha", type=float, default=0.6, help="length penalty (§6.1)")
    ev.add_argument("--max-len-offset", type=int, default=50, help="output length <= input length + this")
    ev.add_argument("--beam-stop", choices=["count", "bound"], default="count", help=BEAM_STOP_HELP)
    ev.add_argument("--batch-size", type=_positive_int, default=64, help="sentences per beam search")
    ev.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--quantize", choices=QUANTIZE_MODES,
                    help="score the model as `aiayn translate --quantize` runs it (int8, int8_bf16: CPU only)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of the two lines")

    avg = sub.add_parser("average-checkpoints", help="average the newest N checkpoints of a run (§6.1)")
    avg.add_argument("dir", help="run directory")
    avg.add_argument("--last", type=_positive_int, default=5)
    avg.add_argument("--output", help="default: DIR/averaged.safetensors")

    ex = sub.add_parser(
        "export", help="write a checkpoint for another inference engine (CTranslate2)",
        description="Export a trained model and its vocabulary for another inference engine. --format ctranslate2 "
                    "(needs pip install 'aiayn[ctranslate2]') writes a CTranslate2 model directory: model.bin, "
                    "config.json, the shared vocabulary (the sentencepiece pieces in id order) and a copy of "
                    "vocab.model for tokenizing. Greedy search gives aiayn's tokens; beam search may differ slightly "
                    "(CTranslate2's length penalty is length ** alpha, not GNMT's).")
    ex.add_argument("checkpoint", help=CHECKPOINT_HELP)
    ex.add_argument("out_dir", help="the directory to create (it must not exist, or be empty)")
    ex.add_argument("--format", default="ctranslate2", help="ctranslate2 (the default, and the only one so far)")
    ex.add_argument("--quantization", default="float32",
                    help="how CTranslate2 stores the weights: float32 (default), int8 (= int8_float32 on a CPU), "
                         "int8_float32, int8_float16, int8_bfloat16, int16, float16, bfloat16 (bf16)")
    ex.add_argument("--vocab", help="sentencepiece model (default: vocab.model next to the checkpoint)")
    return parser


def _train(args):
    from aiayn.train.config_file import MODEL_FLAGS, TrainSettings
    from aiayn.train.run import RunArgs, run_training

    model = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in MODEL_FLAGS.items()}
    train = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)}
    run_training(RunArgs(
        out=args.out, src=args.src, tgt=args.tgt, valid_src=args.valid_src, valid_tgt=args.valid_tgt,
        config=args.config, preset=args.preset,
        model={k: v for k, v in model.items() if v is not None}, train={k: v for k, v in train.items() if v is not None},
        vocab=args.vocab, resume=args.resume, device=args.device, progress=not args.no_progress))
    return 0


def _evaluate(args):
    from aiayn.evaluate import evaluate_file

    result = evaluate_file(args.checkpoint, args.src, args.ref, output=args.output, vocab=args.vocab,
                           beam=args.beam, alpha=args.alpha, max_len_offset=args.max_len_offset,
                           batch_size=args.batch_size, device=args.device, precision=args.quantize or "float32",
                           early_stopping=args.beam_stop == "count")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "hypotheses"}, indent=1))
    else:
        print(f"{result['bleu_text']}  signature: {result['bleu_signature']}")
        print(f"{result['chrf_text']}  signature: {result['chrf_signature']}")
    return 0


def _export(args):
    from aiayn.export import export_checkpoint

    done = export_checkpoint(args.checkpoint, args.out_dir, format=args.format, quantization=args.quantization,
                             vocab=args.vocab)
    print(f"exported {done['model']} to {done['out_dir']} ({args.format}, {done['quantization']} weights)")
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
    elif args.command == "evaluate":
        return _evaluate(args)
    elif args.command == "translate":
        from aiayn.translate import run_translate

        return run_translate(args)
    elif args.command == "export":
        return _export(args)
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
