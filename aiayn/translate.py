"""`aiayn translate`: a trained checkpoint and its vocabulary turn stdin into stdout, line by line
(each line is flushed as soon as it is translated, so the command works in a pipe)."""

import os

import torch

from aiayn.data import Vocabulary
from aiayn.errors import UserInputError
from aiayn.train.checkpoint import load_model, resolve_model_file
from aiayn.train.run import VOCAB_NAME, pick_device


def load_translator(checkpoint, vocab=None, device=None):
    """(model in eval mode, vocabulary) from a run directory or a .safetensors file; the vocabulary
    defaults to vocab.model next to the checkpoint."""
    path = resolve_model_file(checkpoint)
    vocab_path = vocab or os.path.join(os.path.dirname(os.path.abspath(path)), VOCAB_NAME)
    vocabulary = Vocabulary(vocab_path)
    model = load_model(path, map_location=pick_device(device))
    cfg = model.config
    if (cfg.src_vocab_size, cfg.tgt_vocab_size) != (len(vocabulary), len(vocabulary)):
        raise UserInputError(f"checkpoint {path!r} has vocabulary sizes {cfg.src_vocab_size}/{cfg.tgt_vocab_size} "
                             f"but {vocab_path!r} has {len(vocabulary)} pieces: they come from different runs")
    return model.eval(), vocabulary


def translate_lines(model, vocab, lines, out, *, beam=4, alpha=0.6, max_len_offset=50):
    """Writes one translation per input line to `out` (an empty line stays empty)."""
    cfg = model.config
    device = next(model.parameters()).device
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip():
            ids = vocab.encode(text)[:cfg.max_len - 1] + [cfg.eos_id]
            with torch.no_grad():
                hyp = model.generate(torch.tensor([ids], device=device), beam_size=beam, length_penalty=alpha,
                                     max_len_offset=max_len_offset)[0]
            text = vocab.decode(hyp)
        else:
            text = ""
        out.write(text + "\n")
        out.flush()
