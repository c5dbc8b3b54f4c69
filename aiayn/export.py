"""Exporting a trained :class:`aiayn.nn.Transformer` to other inference engines: ``aiayn export
--format ctranslate2 CHECKPOINT OUT_DIR`` (this module is aiayn.export).

CTranslate2 (``pip install aiayn[ctranslate2]``) runs the exported model with the same weights:

* post-LN (the paper's, aiayn's default) is CTranslate2's ``pre_norm=False``; a pre-LN model
  (``norm_first``) maps to ``pre_norm=True`` with its final LayerNorms;
* the position table is written out explicitly: aiayn interleaves sin/cos (§3.5 as the paper
  writes it) while CTranslate2's built-in table puts all sines before all cosines;
* embeddings are scaled by sqrt(d_model) in both (``scale_embeddings``); one shared matrix is the
  source and target embedding and the projection (CTranslate2 stores it once, as an alias);
* the source gets EOS appended (``add_source_eos``, as ``aiayn translate`` does) and decoding starts
  from BOS (``decoder_start_token``); the vocabulary files list the sentencepiece pieces in id
  order, so every id, special tokens included, maps to itself.

Greedy search gives the same tokens in both engines. Beam search may differ slightly: CTranslate2
divides a hypothesis' log-probability by ``length ** alpha``, aiayn by GNMT's ``((5 + length) / 6)
** alpha``. :func:`ctranslate2_translate_ids` decodes with CTranslate2 the way
:func:`aiayn.translate.translate_ids` does with aiayn (same batches, padding and BOS never emitted,
an empty output allowed).
"""

import os
import shutil
import tempfile

import torch

from aiayn.errors import UserInputError

__all__ = ["FORMATS", "CT2_QUANTIZATIONS", "export_checkpoint", "export_ctranslate2", "ctranslate2_spec",
           "ctranslate2_translate_ids", "vocabulary_tokens"]

FORMATS = ("ctranslate2",)
# CTranslate2's weight types (ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES), listed here so
# that the CLI can check an option without importing ctranslate2; "bf16" and "fp16" are aliases.
CT2_QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                     "bfloat16")
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "int8_bf16": "int8_bfloat16", "int8_fp16": "int8_float16"}
# Rows of the position table beyond the model's max_len: the decoder may run past it (output
# length = source length + max_len_offset), and CTranslate2's table does not grow.
_EXTRA_POSITIONS = 256


def _require_ctranslate2():
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        raise UserInputError("--format ctranslate2 needs the ctranslate2 package, which is not installed: "
                             "pip install 'aiayn[ctranslate2]' (or pip install ctranslate2)") from None
    import ctranslate2
    return ctranslate2


def _quantization(name):
    name = _ALIASES.get(name, name)
    if name not in CT2_QUANTIZATIONS:
        raise UserInputError(f"--quantization {name!r} is not one CTranslate2 supports; choose one of "
                             f"{', '.join(CT2_QUANTIZATIONS)} (or bf16, fp16)")
    return name


def vocabulary_tokens(vocab):
    """The pieces of a vocabulary in id order: an :class:`aiayn.data.Vocabulary`, a path to a
    sentencepiece model, or a list of strings (returned as a list)."""
    if isinstance(vocab, (str, os.PathLike)):
        from aiayn.data import Vocabulary

        vocab = Vocabulary(os.fspath(vocab))
    if hasattr(vocab, "sp"):
        return [vocab.sp.IdToPiece(i) for i in range(len(vocab))]
    tokens = list(vocab)
    if len(set(tokens)) != len(tokens):
        raise ValueError("vocabulary_tokens: the tokens must be distinct (CTranslate2 maps them back to ids)")
    return tokens


def _array(tensor):
    # A float32 copy that shares no memory with the model: CTranslate2's int8 conversion scales
    # the arrays it is given in place.
    return tensor.detach().to("cpu", torch.float32).clone().numpy()


def _linear(spec, weight, bias=None):
    spec.weight = _array(weight)
    if bias is not None:
        spec.bias = _array(bias)


def _layer_norm(spec, norm):
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _attention(spec, attn, self_attention):
    d = attn.d_model
    if self_attention:  # CTranslate2 fuses Q, K, V in this order, as aiayn's in_proj_weight does
        _linear(spec.linear[0], attn.in_proj_weight, attn.in_proj_bias)
    else:  # queries from the decoder; keys and values (fused) from the encoder output
        bias = attn.in_proj_bias
        _linear(spec.linear[0], attn.in_proj_weight[:d], None if bias is None else bias[:d])
        _linear(spec.linear[1], attn.in_proj_weight[d:], None if bias is None else bias[d:])
    _linear(spec.linear[-1], attn.out_proj.weight, attn.out_proj.bias)


def _ffn(spec, ffn, norm):
    _linear(spec.linear_0, ffn.w_1.weight, ffn.w_1.bias)
    _linear(spec.linear_1, ffn.w_2.weight, ffn.w_2.bias)
    _layer_norm(spec.layer_norm, norm)


def _inputs(spec, embedding, positions):
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = embedding
    spec.scale_embeddings = True  # aiayn's Embeddings multiply by sqrt(d_model), as CTranslate2 does
    spec.position_encodings.encodings = positions


def ctranslate2_spec(model, tokens):
    """A ``ctranslate2.specs.TransformerSpec`` holding copies of ``model``'s weights (float32,
    whatever the model's dtype) and ``tokens`` (the pieces in id order) as source and target
    vocabulary. ``model`` is not changed."""
    from ctranslate2.specs import TransformerSpec

    from aiayn.data import UNK_ID
    from aiayn.nn import Transformer

    if not isinstance(model, Transformer):
        raise TypeError(f"ctranslate2_spec: 'model' must be an aiayn.nn.Transformer, got {type(model).__name__}")
    cfg = model.config
    tokens = vocabulary_tokens(tokens)
    if len(tokens) != cfg.src_vocab_size or len(tokens) != cfg.tgt_vocab_size:
        raise UserInputError(f"the vocabulary has {len(tokens)} pieces but the model's vocabulary sizes are "
                             f"{cfg.src_vocab_size}/{cfg.tgt_vocab_size}: they come from different runs")
    pre_norm = cfg.norm_first
    spec = TransformerSpec.from_config((cfg.num_layers, cfg.num_layers), cfg.num_heads, pre_norm=pre_norm,
                                       no_final_norm=pre_norm and model.encoder.norm is None)
    positions = model.positional_encoding._table(cfg.max_len + _EXTRA_POSITIONS, cfg.d_model).float().numpy()
    src_embedding = _array(model.src_embed.weight)
    tgt_embedding = src_embedding if model.tgt_embed is model.src_embed else _array(model.tgt_embed.weight)
    _inputs(spec.encoder, src_embedding, positions)
    _inputs(spec.decoder, tgt_embedding, positions)
    spec.decoder.projection.weight = (tgt_embedding if model.generator is None else _array(model.generator.weight))
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder.layers):
        _attention(layer_spec.self_attention, layer.self_attn, True)
        _layer_norm(layer_spec.self_attention.layer_norm, layer.sublayer[0].norm)
        _ffn(layer_spec.ffn, layer.feed_forward, layer.sublayer[1].norm)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder.layers):
        _attention(layer_spec.self_attention, layer.self_attn, True)
        _layer_norm(layer_spec.self_attention.layer_norm, layer.sublayer[0].norm)
        _attention(layer_spec.attention, layer.cross_attn, False)
        _layer_norm(layer_spec.attention.layer_norm, layer.sublayer[1].norm)
        _ffn(layer_spec.ffn, layer.feed_forward, layer.sublayer[2].norm)
    for stack_spec, stack in ((spec.encoder, model.encoder), (spec.decoder, model.decoder)):
        if stack.norm is not None:
            _layer_norm(stack_spec.layer_norm, stack.norm)

    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    config = spec.config
    config.bos_token = config.decoder_start_token = tokens[cfg.bos_id]
    config.eos_token = tokens[cfg.eos_id]
    config.add_source_bos, config.add_source_eos = False, True  # aiayn translate appends EOS to the source
    if len(tokens) > UNK_ID:  # aiayn's vocabularies put unk after pad, bos and eos
        config.unk_token = tokens[UNK_ID]
    config.layer_norm_epsilon = cfg.layer_norm_eps
    return spec


def export_ctranslate2(model, out_dir, vocab, quantization="float32"):
    """Writes ``model`` (an :class:`aiayn.nn.Transformer`) with ``vocab`` (see
    :func:`vocabulary_tokens`) as a CTranslate2 model directory ``out_dir`` (which must not exist,
    or be empty), weights stored as ``quantization``. A sentencepiece vocabulary given as a file or
    :class:`aiayn.data.Vocabulary` is copied in as ``vocab.model``. The directory appears whole or
    not at all. Returns ``out_dir``."""
    ctranslate2 = _require_ctranslate2()
    quantization = _quantization(quantization)
    out_dir = os.fspath(out_dir)
    _check_target(out_dir)
    sp_model = None
    if isinstance(vocab, (str, os.PathLike)):
        sp_model = os.fspath(vocab)
    elif hasattr(vocab, "path"):
        sp_model = vocab.path
    spec = ctranslate2_spec(model, vocab)

    class _Converter(ctranslate2.converters.Converter):
        def _load(self):
            return spec

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        model_dir = os.path.join(staging, "model")
        _Converter().convert(model_dir, quantization=quantization)
        if sp_model is not None:
            shutil.copyfile(sp_model, os.path.join(model_dir, "vocab.model"))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.rename(model_dir, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _check_target(out_dir):
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        what = "a non-empty directory" if os.path.isdir(out_dir) else "a file"
        raise UserInputError(f"export target {out_dir!r} already exists and is {what}: give a new or empty directory")


def export_checkpoint(checkpoint, out_dir, format="ctranslate2", quantization="float32", vocab=None):
    """``aiayn export``: the model of ``checkpoint`` (a .safetensors file or a run directory, see
    :func:`aiayn.train.checkpoint.resolve_model_file`) and its vocabulary (``vocab``, default
    vocab.model next to it) written to ``out_dir`` in ``format``. Every check runs before anything
    is written. Returns {"model", "vocab", "out_dir", "quantization"}."""
    if format not in FORMATS:
        raise UserInputError(f"--format {format!r} is not supported; choose one of {', '.join(FORMATS)}")
    quantization = _quantization(quantization)
    _check_target(os.fspath(out_dir))
    from aiayn.data import Vocabulary
    from aiayn.train.checkpoint import load_model, resolve_model_file
    from aiayn.train.run import VOCAB_NAME

    path = resolve_model_file(os.fspath(checkpoint))
    model = load_model(path)
    vocab_path = vocab or os.path.join(os.path.dirname(os.path.abspath(path)), VOCAB_NAME)
    if not os.path.isfile(vocab_path):
        raise UserInputError(f"vocabulary {vocab_path!r} does not exist (give the sentencepiece model with --vocab)")
    vocabulary = Vocabulary(vocab_path)
    cfg = model.config
    if (cfg.src_vocab_size, cfg.tgt_vocab_size) != (len(vocabulary), len(vocabulary)):
        raise UserInputError(f"checkpoint {path!r} has vocabulary sizes {cfg.src_vocab_size}/{cfg.tgt_vocab_size} "
                             f"but {vocab_path!r} has {len(vocabulary)} pieces: they come from different runs")
    _require_ctranslate2()  # last: the checks above need no ctranslate2, and report what they find first
    export_ctranslate2(model, out_dir, vocabulary, quantization)
    return {"model": path, "vocab": vocab_path, "out_dir": os.fspath(out_dir), "quantization": quantization}


def ctranslate2_translate_ids(translator, src_ids, tokens, *, beam=4, alpha=0.6, max_len_offset=50, batch_size=32,
                              max_tokens=0, pad_id=0, bos_id=1, eos_id=2):
    """:func:`aiayn.translate.translate_ids` on a ``ctranslate2.Translator``: token-id sentences
    (without EOS; the exported model appends it) translated in the same length-sorted batches, in
    input order, as token ids without BOS/EOS. As in aiayn's search, padding and BOS are never
    emitted, an empty output is allowed, and outputs stop at the source length + EOS +
    ``max_len_offset`` tokens (CTranslate2's limit is per batch: longer outputs are cut).
    ``alpha`` is CTranslate2's length penalty (length ** alpha, not GNMT's)."""
    from aiayn.translate import length_batches

    index = {t: i for i, t in enumerate(tokens)}
    suppress = [[tokens[i]] for i in (pad_id, bos_id) if i is not None and i != eos_id]
    out = [None] * len(src_ids)
    for batch in length_batches([len(s) + 1 for s in src_ids], batch_size, max_tokens):
        source = [[tokens[t] for t in src_ids[i]] for i in batch]
        results = translator.translate_batch(
            source, beam_size=beam, length_penalty=alpha, max_decoding_length=max(len(s) for s in source) + 1 +
            max_len_offset, min_decoding_length=0, suppress_sequences=suppress, max_input_length=0,
            max_batch_size=0)
        for i, r in zip(batch, results):
            # aiayn stops each sentence at its own cap (EOS forced there), CTranslate2 the whole
            # batch at the longest one's: an output running past its sentence's cap is cut there.
            # For greedy search that is exactly aiayn's output; for beam search a close one.
            hyp = [index[t] for t in r.hypotheses[0] if index[t] != eos_id]
            out[i] = hyp[:len(src_ids[i]) + 1 + max_len_offset]
    return out
