"""`aiayn evaluate`: a checkpoint translates a test set (beam search, batched by length) and sacrebleu
scores it, BLEU and chrF with their signatures, so a reported number says how it was computed
(tokenization, casing, smoothing, sacrebleu's version)."""

import os
import sys
import time

from aiayn.data import read_lines
from aiayn.errors import UserInputError
from aiayn.train.checkpoint import atomic_write, resolve_model_file
from aiayn.translate import load_translator, translate_ids


def score(hypotheses, references):
    """{"bleu", "bleu_text", "bleu_signature", "chrf", ...} of detokenized hypotheses against one
    reference each (sacrebleu's defaults: 13a tokenization, mixed case; chrF2)."""
    from sacrebleu.metrics import BLEU, CHRF

    out = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        result = metric.corpus_score(list(hypotheses), [list(references)])
        out[name], out[f"{name}_text"], out[f"{name}_signature"] = result.score, str(result), str(metric.get_signature())
    return out


def evaluate_file(checkpoint, src, ref, *, output=None, vocab=None, beam=4, alpha=0.6, max_len_offset=50,
                  batch_size=64, device="cpu", progress=True, precision="float32", early_stopping=True):
    """Translates the lines of `src` with `checkpoint` (a run directory or a .safetensors file) and
    scores them against `ref`; writes the translations to `output` in input order when given (only
    after everything else succeeded, so a bad input overwrites nothing). Returns score()'s dict plus
    checkpoint, sentences, seconds and hypotheses. ``precision`` "bf16" / "int8" scores the model as
    ``aiayn translate --quantize`` runs it; ``early_stopping``: as :func:`aiayn.translate.translate_ids`."""
    src_lines = read_lines(src, "source file")
    ref_lines = read_lines(ref, "reference file")
    if len(src_lines) != len(ref_lines):
        raise UserInputError(f"source file {src!r} has {len(src_lines)} lines but reference file {ref!r} has "
                             f"{len(ref_lines)}; they must be aligned line by line")
    if output is not None:
        if os.path.isdir(output):
            raise UserInputError(f"--output {output!r} is a directory")
        if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
            raise UserInputError(f"--output {output!r}: its directory does not exist")
    path = resolve_model_file(checkpoint)
    model, vocabulary = load_translator(path, vocab, device, precision=precision)
    cfg = model.config
    # as `aiayn translate` does: a sentence longer than the model's positions is cut
    ids = [vocabulary.encode(line)[:cfg.max_len - 1] for line in src_lines]
    if progress:
        print(f"translating {len(ids)} sentences with {path} (beam {beam}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    hyps = [vocabulary.decode(h) for h in translate_ids(model, ids, beam=beam, alpha=alpha, batch_size=batch_size,
                                                        max_len_offset=max_len_offset,
                                                        early_stopping=early_stopping)]
    seconds = time.perf_counter() - start
    result = {"checkpoint": path, "precision": precision, "sentences": len(hyps), "seconds": round(seconds, 3), **score(hyps, ref_lines),
              "hypotheses": hyps}
    if output is not None:
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(h + "\n" for h in hyps)

        atomic_write(output, write)
        result["output"] = output
    return result
