"""`aiayn translate`: a trained checkpoint and its vocabulary turn text into translations.

Input is read in chunks of lines; each chunk is sorted by length into batches (`batch_size`
sentences, or a `max_tokens` budget of padded source tokens), decoded with beam search, and written
back in input order and flushed, so the command works on files and in pipes alike (an interactive
stdin is translated line by line). Bytes that are not UTF-8 stop the run with the line number,
after every earlier line has been written."""

import os
import sys
import time

import torch

from aiayn.data import Vocabulary
from aiayn.errors import UserInputError
from aiayn.quantization import INT8_MODES, quantization_of, quantize
from aiayn.train.checkpoint import load_model, resolve_model_file
from aiayn.train.run import VOCAB_NAME, pick_device

PRECISIONS = ("float32", "bf16", "int8", "int8_bf16")


def load_translator(checkpoint, vocab=None, device=None, precision="float32"):
    """(model in eval mode, vocabulary) from a run directory or a .safetensors file; the vocabulary
    defaults to vocab.model next to the checkpoint. ``precision`` "bf16", "int8" or "int8_bf16"
    quantizes the model for inference (:func:`aiayn.quantize`; int8 on the CPU only). A checkpoint saved quantized
    loads as such (then ``precision`` must stay "float32")."""
    path = resolve_model_file(checkpoint)
    vocab_path = vocab or os.path.join(os.path.dirname(os.path.abspath(path)), VOCAB_NAME)
    vocabulary = Vocabulary(vocab_path)
    model = load_model(path, map_location=pick_device(device))
    cfg = model.config
    if (cfg.src_vocab_size, cfg.tgt_vocab_size) != (len(vocabulary), len(vocabulary)):
        raise UserInputError(f"checkpoint {path!r} has vocabulary sizes {cfg.src_vocab_size}/{cfg.tgt_vocab_size} "
                             f"but {vocab_path!r} has {len(vocabulary)} pieces: they come from different runs")
    if quantization_of(model) in INT8_MODES and next(model.parameters()).device.type != "cpu":
        raise UserInputError(f"checkpoint {path!r} is an int8 model, which runs on the CPU only; drop --device cuda")
    if precision not in PRECISIONS:
        raise UserInputError(f"--quantize must be one of {', '.join(PRECISIONS[1:])}, not {precision!r}")
    if precision != "float32":
        if quantization_of(model):
            raise UserInputError(f"--quantize {precision}: checkpoint {path!r} is already quantized "
                                 f"({quantization_of(model)}); drop --quantize")
        if precision in INT8_MODES and next(model.parameters()).device.type != "cpu":
            raise UserInputError(f"--quantize {precision} runs on the CPU only; drop --device cuda")
        model = quantize(model, precision, inplace=True)
    return model.eval(), vocabulary


def length_batches(lengths, batch_size=32, max_tokens=0):
    """Index batches of similar-length sentences: sorted by length (longest first, so a batch too
    large for memory shows at once), at most ``batch_size`` sentences and, with ``max_tokens``, at
    most that many padded source tokens each (a longer sentence alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or (max_tokens and longest * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def translate_ids(model, src_ids, *, beam=4, alpha=0.6, max_len_offset=50, batch_size=32, max_tokens=0,
                  early_stopping=True):
    """Beam-search translations (token ids, no BOS/EOS) of token-id sentences (without EOS: it is
    appended here), in input order, batched by :func:`length_batches`; ``early_stopping``: the
    search's stopping rule (:func:`aiayn.decoding.beam_search`)."""
    cfg = model.config
    device = next(model.parameters()).device
    out = [None] * len(src_ids)
    for batch in length_batches([len(s) + 1 for s in src_ids], batch_size, max_tokens):
        width = max(len(src_ids[i]) for i in batch) + 1
        src = torch.full((len(batch), width), cfg.pad_id if cfg.pad_id is not None else cfg.eos_id, dtype=torch.long)
        mask = torch.ones(len(batch), width, dtype=torch.bool)
        for row, i in enumerate(batch):
            src[row, :len(src_ids[i]) + 1] = torch.tensor(list(src_ids[i]) + [cfg.eos_id])
            mask[row, :len(src_ids[i]) + 1] = False
        with torch.no_grad():
            hyps = model.generate(src.to(device), mask.to(device), beam_size=beam, length_penalty=alpha,
                                  max_len_offset=max_len_offset, **({} if early_stopping else {"early_stopping": False}))
        for i, h in zip(batch, hyps):
            out[i] = list(h)
    return out


def _decode_line(raw, number, name):
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise UserInputError(f"{name} line {number} is not UTF-8 text (byte {e.start + 1} of the line is "
                             f"0x{raw[e.start]:02x})") from None


def _chunks(stream, size, name):
    """Lists of (line number, text) of up to ``size`` lines from a binary stream."""
    chunk = []
    for number, raw in enumerate(stream, 1):
        try:
            chunk.append((number, _decode_line(raw, number, name)))
        except UserInputError:
            if chunk:  # the lines before the bad one are still translated and written
                yield chunk
            raise
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def translate_stream(model, vocab, stream, out, *, beam=4, alpha=0.6, max_len_offset=50, batch_size=32,
                     max_tokens=0, chunk_lines=None, name="input", progress=None, early_stopping=True):
    """Translates the lines of a binary ``stream`` into the text stream ``out``, one line each (an
    empty line stays empty). ``chunk_lines`` lines are read, translated and written at a time
    (default 16 batches' worth; 1 gives line-by-line streaming). ``progress``: a tqdm bar to advance
    by lines; ``early_stopping``: as :func:`translate_ids`. Returns {"sentences", "source_tokens",
    "target_tokens", "seconds"}."""
    cfg = model.config
    chunk_lines = chunk_lines or 16 * batch_size
    stats = {"sentences": 0, "source_tokens": 0, "target_tokens": 0}
    start = time.perf_counter()
    for chunk in _chunks(stream, chunk_lines, name):
        texts = [text for _, text in chunk]
        todo = [i for i, text in enumerate(texts) if text.strip()]
        ids = [vocab.encode(texts[i])[:cfg.max_len - 1] for i in todo]  # + EOS: within the model's positions
        hyps = translate_ids(model, ids, beam=beam, alpha=alpha, max_len_offset=max_len_offset,
                             batch_size=batch_size, max_tokens=max_tokens, early_stopping=early_stopping)
        results = [""] * len(texts)
        for i, h in zip(todo, hyps):
            results[i] = vocab.decode(h)
        out.write("".join(r + "\n" for r in results))
        out.flush()
        stats["sentences"] += len(todo)
        stats["source_tokens"] += sum(len(s) + 1 for s in ids)
        stats["target_tokens"] += sum(len(h) + 1 for h in hyps)  # + EOS, as engines count them
        if progress is not None:
            progress.update(len(chunk))
    stats["seconds"] = time.perf_counter() - start
    return stats


def run_translate(args):
    """The `aiayn translate` command: options from argparse (see aiayn.cli)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quantize and pick_device(args.device).type == "cuda" and args.quantize != "bf16":
        raise UserInputError(f"--quantize {args.quantize} runs on the CPU only; drop --device cuda")
    if args.output and os.path.abspath(args.output) == os.path.abspath(args.input or ""):
        raise UserInputError(f"--output {args.output!r} is the input file: it would be overwritten")
    model, vocab = load_translator(args.checkpoint, args.vocab, args.device, args.quantize or "float32")
    if args.input:
        if not os.path.isfile(args.input):
            raise UserInputError(f"--input {args.input!r} does not exist")
        stream, name = open(args.input, "rb"), f"--input {args.input!r}"
        with open(args.input, "rb") as f:
            total = sum(1 for _ in f)
    else:
        stream, name, total = sys.stdin.buffer, "standard input", None
    interactive = not args.input and sys.stdin.isatty()
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    bar = None
    if args.input and not args.no_progress and total:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="line", desc="translate", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        stats = translate_stream(model, vocab, stream, out, beam=args.beam, alpha=args.alpha,
                                 max_len_offset=args.max_len_offset, batch_size=args.batch_size,
                                 max_tokens=args.max_tokens or 0, chunk_lines=1 if interactive else None,
                                 name=name, progress=bar, early_stopping=args.beam_stop == "count")
    finally:
        if bar is not None:
            bar.close()
        if args.input:
            stream.close()
        if args.output:
            out.close()
    seconds = max(stats["seconds"], 1e-9)
    if not args.quiet:
        print(f"translated {stats['sentences']} sentences ({stats['target_tokens']} target tokens) in {seconds:.1f} s: "
              f"{stats['sentences'] / seconds:.1f} sentences/s, {stats['target_tokens'] / seconds:.0f} tokens/s",
              file=sys.stderr)
    return 0
