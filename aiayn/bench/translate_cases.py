"""The translate cases of the benchmark registry (aiayn.bench.cases): whole engines racing on the
same weights (issue 22), aiayn float32 / bf16 / int8 / int8_bf16 against CTranslate2 on the weights
``aiayn export`` writes. Imported by cases.py, which holds ``register``."""

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

import aiayn

from .cases import _corpus_pairs, register

# --- translation: whole engines racing on the same weights (issue 22) ------------------------------
#
# Not an op against its torch equivalent: several engines translate one fixed set of sentences
# (beam 4, length-sorted batches of 32 as `aiayn translate` makes them) and each reports sentences/s,
# target tokens/s and the fraction of its outputs identical to aiayn float32's. The runner
# (aiayn.bench.run_case) recognises the Engines this returns.


@dataclass
class Engine:
    name: str
    translate: Callable[[list], list] | None  # token-id sentences -> token-id outputs in order; None: skipped
    note: str = ""


@dataclass
class Engines:
    engines: list
    src_ids: list
    shape: tuple
    setting: str  # what was translated and how, printed above the engines' rows
    reference: str = "aiayn float32"
    notes: list = field(default_factory=list)
    keep: list = field(default_factory=list)  # alive while the case runs (the exported models' directory)


# What `aiayn bench --checkpoint RUN --src FILE [--sentences N]` sets: the translate cases then use
# that model and text instead of random weights and synthetic sentences.
TRANSLATE_INPUT = {"checkpoint": None, "src": None, "sentences": None}
TRANSLATE_THREADS = 2  # both engines alike: torch.set_num_threads, CTranslate2 intra_threads (inter_threads 1)
_LENGTH_PENALTY_NOTE = ("CTranslate2's length penalty divides by length ** alpha, aiayn's by GNMT's "
                        "((5 + length) / 6) ** alpha (both alpha 0.6), so beam outputs may differ where "
                        "hypotheses are close; greedy outputs are identical (tests/test_export.py)")


@contextlib.contextmanager
def _torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def translate_engines(model, tokens, src_ids, *, setting, beam=4, alpha=0.6, max_len_offset=50, batch_size=32,
                      threads=TRANSLATE_THREADS):
    """The engines that translate ``src_ids`` with ``model`` (a float32 aiayn Transformer) and its
    vocabulary ``tokens``: aiayn float32, bf16, int8 and int8_bf16 (where ``aiayn.quantize`` implements them), and
    CTranslate2 float32 and int8 on the exported weights (where ctranslate2 is installed)."""
    from aiayn.quantization import quantization_of
    from aiayn.translate import translate_ids

    if quantization_of(model):
        raise ValueError(f"the translate benchmark needs a float32 model, not one quantized as {quantization_of(model)}")
    model = model.cpu().eval()

    def aiayn_engine(m):
        def run(src):
            with _torch_threads(threads):
                return translate_ids(m, src, beam=beam, alpha=alpha, max_len_offset=max_len_offset,
                                     batch_size=batch_size)
        return run

    engines = [Engine("aiayn float32", aiayn_engine(model)),
               Engine("aiayn bf16", aiayn_engine(aiayn.quantize(model, "bf16")))]
    for mode in ("int8", "int8_bf16"):
        try:
            engines.append(Engine(f"aiayn {mode}", aiayn_engine(aiayn.quantize(model, mode))))
        except NotImplementedError as e:
            engines.append(Engine(f"aiayn {mode}", None, f"skipped: {e}"))
    keep, notes = [], [_LENGTH_PENALTY_NOTE]
    try:
        import ctranslate2
    except ImportError:
        why = "skipped: ctranslate2 is not installed (pip install 'aiayn[ctranslate2]')"
        engines += [Engine("ctranslate2 float32", None, why), Engine("ctranslate2 int8", None, why)]
    else:
        import os
        import tempfile

        from aiayn.export import ctranslate2_translate_ids, export_ctranslate2

        notes.append(f"CTranslate2 {ctranslate2.__version__} on its default CPU backend (CT2_VERBOSE=1 prints the ISA "
                     "and GEMM library it picks; on AMD CPUs it leaves MKL out unless CT2_USE_MKL=1)")
        folder = tempfile.TemporaryDirectory(prefix="aiayn-bench-ct2-")
        keep.append(folder)
        for quantization in ("float32", "int8"):
            path = export_ctranslate2(model, os.path.join(folder.name, quantization), tokens, quantization)
            translator = ctranslate2.Translator(path, device="cpu", compute_type="default", intra_threads=threads,
                                                inter_threads=1)

            def run(src, translator=translator):
                return ctranslate2_translate_ids(translator, src, tokens, beam=beam, alpha=alpha,
                                                 max_len_offset=max_len_offset, batch_size=batch_size)
            engines.append(Engine(f"ctranslate2 {quantization}", run))
    longest = max(len(s) for s in src_ids) + 1
    return Engines(engines, src_ids, (len(src_ids), longest, beam), setting, notes=notes, keep=keep)


def _synthetic_translation(preset, vocab, sentences, seed=0):
    """A model of ``preset`` size with random weights and synthetic sentences of Multi30k's lengths:
    a random model never emits EOS, so outputs run to source length + 1 + 10 tokens (the cap; per
    sentence in aiayn, per batch in CTranslate2), and its near-uniform predictions make the agreement
    column meaningless (a rounding difference flips a near-tie)."""
    torch.manual_seed(seed)
    model = aiayn.nn.Transformer(aiayn.nn.TransformerConfig.preset(preset, vocab)).eval()
    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, vocab)]
    src_ids = [s for s, _ in _corpus_pairs(sentences, vocab, seed)]
    return model, tokens, src_ids


def _translation_from_checkpoint(settings):
    from aiayn.export import vocabulary_tokens
    from aiayn.translate import load_translator

    model, vocab = load_translator(settings["checkpoint"], device="cpu")
    with open(settings["src"], encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    if settings["sentences"]:
        lines = lines[:settings["sentences"]]
    # As aiayn translate encodes them: empty lines are not translated, + EOS within the positions.
    src_ids = [vocab.encode(line)[:model.config.max_len - 1] for line in lines if line.strip()]
    if not src_ids:
        raise ValueError(f"--src {settings['src']!r} holds no sentence to translate")
    return model, vocabulary_tokens(vocab), src_ids, len(lines)


@register("translate.beam4.multi30k", devices=("cpu",), baseline="engines")
def _translate_multi30k(device, dtype, quick):
    # The Multi30k-size model ("small": 3 + 3 layers, d_model 256, d_ff 1024, 4 heads, 8000 pieces):
    # a trained checkpoint and real text with --checkpoint / --src, else random weights and synthetic
    # sentences with the output length capped (a random model never stops by itself).
    settings = TRANSLATE_INPUT
    if settings["checkpoint"]:
        model, tokens, src_ids, lines = _translation_from_checkpoint(settings)
        setting = (f"checkpoint {settings['checkpoint']}, {len(src_ids)} sentences of {settings['src']} "
                   f"(first {lines} lines)")
        offset = 50
    else:
        model, tokens, src_ids = _synthetic_translation("small", 8000, 16 if quick else 96)
        setting = (f"random weights (small preset, vocabulary 8000), {len(src_ids)} synthetic sentences, "
                   "outputs capped at source length + 11 tokens (agreement is meaningless on random weights)")
        offset = 10
    return translate_engines(model, tokens, src_ids, setting=setting, max_len_offset=offset)


@register("translate.beam4.base", devices=("cpu",), baseline="engines")
def _translate_base(device, dtype, quick):
    # The base model (Table 3) with a 37000-piece vocabulary, random weights: the vocabulary
    # projection and 6 + 6 layers weigh more than in the Multi30k model.
    model, tokens, src_ids = _synthetic_translation("base", 37000, 8 if quick else 32)
    setting = (f"random weights (base preset, vocabulary 37000), {len(src_ids)} synthetic sentences, "
               "outputs capped at source length + 11 tokens (agreement is meaningless on random weights)")
    return translate_engines(model, tokens, src_ids, setting=setting, max_len_offset=10)
