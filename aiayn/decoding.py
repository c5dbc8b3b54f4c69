"""Decoding a trained :class:`aiayn.nn.Transformer`: greedy search and beam search with GNMT's
length penalty (Wu et al., 2016, eq. 14; the paper's §6.1 uses beam 4, alpha 0.6, maximum output
length = input length + 50, early stopping), incremental with a per-layer key/value cache.

Each step feeds only the newest token through the decoder: self-attention keys/values of earlier
positions come from the cache (:class:`aiayn.nn.KVCache`), the cross-attention keys/values of the
encoder output are projected once. ``use_cache=False`` instead re-runs the decoder on the whole
prefix at every step (what users of ``nn.Transformer`` do); both give the same tokens.
"""

import contextlib

import torch

from ._ops import packed_weight_cache
from .functional import log_softmax_topk

__all__ = ["generate", "greedy_search", "beam_search", "gnmt_length_penalty"]


def gnmt_length_penalty(length, alpha):
    """``lp(Y) = ((5 + |Y|) / 6) ** alpha``; a finished hypothesis scores ``log P(Y|X) / lp(Y)``."""
    return ((5.0 + length) / 6.0) ** alpha


def generate(model, src, src_key_padding_mask=None, beam_size=4, length_penalty=0.6, max_len_offset=50,
             use_cache=True, early_stopping=True):
    """Beam search (``beam_size > 1``) or greedy search (``beam_size == 1``) for a batch of
    sources ``(B, S)``; returns one list of token ids per sentence (no BOS/EOS/padding)."""
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"generate: 'beam_size' must be a positive int, got {beam_size!r}")
    if not isinstance(early_stopping, bool):
        raise ValueError(f"generate: 'early_stopping' must be True or False, got {early_stopping!r}")
    if beam_size == 1:
        return greedy_search(model, src, src_key_padding_mask, max_len_offset, use_cache)
    return beam_search(model, src, src_key_padding_mask, beam_size, length_penalty, max_len_offset, use_cache,
                       early_stopping)


class _Decoder:
    """One decoding run over a set of rows (hypotheses): the encoder output, its padding mask and the
    cache follow the rows through ``select``."""

    def __init__(self, model, src, src_key_padding_mask, max_len_offset, use_cache):
        if not torch.is_tensor(src) or src.dim() != 2 or src.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"generate: 'src' must be a (B, S) tensor of token ids (int64), got "
                             f"{tuple(src.shape) if torch.is_tensor(src) else type(src).__name__}"
                             f"{' ' + str(src.dtype) if torch.is_tensor(src) else ''}")
        if not isinstance(max_len_offset, int) or max_len_offset < 0:
            raise ValueError(f"generate: 'max_len_offset' must be an int >= 0, got {max_len_offset!r}")
        cfg = model.config
        self.model, self.use_cache = model, use_cache
        src = src.long()
        mask = model._padding_mask(src, src_key_padding_mask)
        if mask is not None and mask.shape != src.shape:
            raise ValueError(f"generate: 'src_key_padding_mask' must have src's shape {tuple(src.shape)}, got "
                             f"{tuple(mask.shape)}")
        lengths = (~mask).sum(1) if mask is not None else torch.full((src.shape[0],), src.shape[1])
        self.max_len = (lengths + max_len_offset).tolist()
        self.memory = model.encode(src, mask)
        self.mask = mask
        self.cache = model.decoder.new_cache() if use_cache else None
        self.tokens = torch.full((src.shape[0], 1), cfg.bos_id, dtype=torch.long, device=src.device)
        self.banned = [i for i in {cfg.pad_id, cfg.bos_id} if i is not None and i != cfg.eos_id]

    def expand(self, times):
        self.select(torch.arange(self.tokens.shape[0], device=self.tokens.device).repeat_interleave(times))

    def logits(self):
        """The next-token logits of every row, ``(rows, vocab)``."""
        t = self.tokens.shape[1] - 1
        if self.use_cache:
            logits = self.model.decode(self.tokens[:, -1:], self.memory, self.mask, cache=self.cache, start=t)
        else:
            no_padding = torch.zeros_like(self.tokens, dtype=torch.bool)
            logits = self.model.decode(self.tokens, self.memory, self.mask, tgt_key_padding_mask=no_padding)
        return logits[:, -1]

    def log_probs(self):
        """log P(next token | prefix) for every row, ``(rows, vocab)`` in float32."""
        logp = torch.log_softmax(self.logits().float(), dim=-1)
        logp[:, self.banned] = float("-inf")  # never emit padding or a second BOS
        return logp

    def top_log_probs(self, k):
        """The ``k`` (at most the vocabulary size) most probable next tokens of every row and their log-probabilities (float32),
        ``(rows, k)`` each, never padding or a second BOS: one pass over the logits
        (:func:`aiayn.functional.log_softmax_topk`)."""
        logits = self.logits()
        return log_softmax_topk(logits, min(k, logits.shape[-1]), self.banned)

    def select(self, rows, same_sources=False):
        """Keep ``rows`` (in this order). ``same_sources``: every new row decodes the same source
        sentence as the old row at its position (beam search reordering hypotheses within each
        sentence), so the encoder output and the cross-attention keys/values stay as they are."""
        self.tokens = self.tokens.index_select(0, rows)
        if not same_sources:
            self.memory = self.memory.index_select(0, rows)
            self.mask = None if self.mask is None else self.mask.index_select(0, rows)
        if self.cache is not None:
            for layer in self.cache:
                layer["self"].reorder(rows)
                if not same_sources:
                    layer["cross"].reorder(rows)


@contextlib.contextmanager
def _frozen_weights():
    """No autograd, and each weight packed into the GEMM's panel layout once instead of once per
    step (the weights do not change while decoding). The packed copies stay cached while the weights
    live and are unchanged, so later searches (``aiayn translate`` calls one per batch) reuse them;
    they take about the model's size again, and ``aiayn._C.clear_pack_cache()`` frees them.
    Inference mode rather than no_grad: it takes the autograd dispatch keys out altogether, so each
    of aiayn's ops skips its Python autograd kernel (~10 us a call, ~30 calls a decoder step); the
    tensors made here (caches, scores) never leave the search."""
    with torch.inference_mode(), packed_weight_cache():
        yield


def _strip(tokens, eos_id):
    return [t for t in tokens if t != eos_id]


def greedy_search(model, src, src_key_padding_mask=None, max_len_offset=50, use_cache=True):
    """The most probable next token at each step, until EOS or the maximum length. Rows that end
    leave the batch; the bookkeeping is tensor work over the live rows (no loop over sentences)."""
    was_training = model.training
    model.eval()
    try:
        with _frozen_weights():
            run = _Decoder(model, src, src_key_padding_mask, max_len_offset, use_cache)
            eos = model.config.eos_id
            results = [None] * src.shape[0]
            alive = torch.arange(src.shape[0], device=run.tokens.device)  # sentence of each row
            max_len = torch.tensor(run.max_len, device=run.tokens.device)
            while True:
                t = run.tokens.shape[1] - 1  # tokens generated so far
                best = run.log_probs().argmax(-1)
                best = torch.where(t >= max_len[alive], eos, best)  # maximum length: EOS is forced
                run.tokens = torch.cat([run.tokens, best[:, None]], 1)
                done = best == eos
                if not bool(done.any()):
                    continue
                finished = done.nonzero().squeeze(1)
                for b, row in zip(alive[finished].tolist(), run.tokens[finished, 1:].tolist()):
                    results[b] = _strip(row, eos)
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    return results
                alive = alive[keep]
                run.select(keep)
    finally:
        model.train(was_training)


def beam_search(model, src, src_key_padding_mask=None, beam_size=4, length_penalty=0.6, max_len_offset=50,
                use_cache=True, early_stopping=True):
    """Beam search as in fairseq: at each step the 2k best extensions of the k live hypotheses are
    ranked by log-probability; those ending in EOS among the first k are finished (scored
    ``log P / lp``, :func:`gnmt_length_penalty`), the first k others live on. A sentence stops once it
    has k finished hypotheses (``early_stopping=True``, fairseq's rule) or reaches its maximum length
    (EOS forced); the best-scoring finished hypothesis is returned. Sentences that stop leave the
    batch.

    ``early_stopping=False`` stops a sentence only when none of its live hypotheses can still beat
    its best finished one: a live hypothesis' log-probability only falls as it grows, so its best
    possible score is ``log P / lp`` at the length (now or the maximum) where ``lp`` is largest.
    fairseq's count can stop before the best hypothesis finishes where, step after step, EOS is
    among the top alternatives of the best prefix (a model sure of the right token and indifferent
    among the rest: the demo's copy task); the bound never returns a lower-scoring hypothesis, at
    the price of more steps."""
    was_training = model.training
    model.eval()
    try:
        with _frozen_weights():
            return _beam_search(model, src, src_key_padding_mask, beam_size, length_penalty, max_len_offset,
                                use_cache, early_stopping)
    finally:
        model.train(was_training)


def _beam_search(model, src, src_key_padding_mask, k, alpha, max_len_offset, use_cache, early_stopping=True):
    """The search as tensor work over all live sentences at once: a step costs a fixed number of
    small ops whatever the batch, with no Python loop over sentences or candidates."""
    run = _Decoder(model, src, src_key_padding_mask, max_len_offset, use_cache)
    eos = model.config.eos_id
    device = run.tokens.device
    B = src.shape[0]
    run.expand(k)
    max_len = torch.tensor(run.max_len, device=device)
    sent = torch.arange(B, device=device)  # sentence of each block of k rows
    scores = torch.full((B, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all k rows start identical: extend only the first
    n_finished = torch.zeros(B, dtype=torch.long, device=device)
    best_score = torch.full((B,), float("-inf"), dtype=torch.float64, device=device)
    best = [None] * B  # tokens of each sentence's best finished hypothesis
    while True:
        A, t = len(sent), run.tokens.shape[1] - 1
        # Each row's best 2k continuations hold every candidate of its sentence's top 2k.
        logp, tok = run.top_log_probs(2 * k)
        per_row = logp.shape[-1]
        forced = t >= max_len[sent]
        if bool(forced.any()):  # maximum length: EOS is the only continuation
            logp.view(A, k, per_row)[forced] = float("-inf")
            logp.view(A, k, per_row)[forced, :, 0] = 0.0
            tok.view(A, k, per_row)[forced, :, 0] = eos
        cand = (scores[:, :, None] + logp.view(A, k, per_row)).view(A, k * per_row)
        width = min(2 * k, k * per_row)
        top, index = cand.topk(width, dim=-1)
        beam, token = index // per_row, tok.view(A, k * per_row).gather(1, index)
        valid = top != float("-inf")  # topk sorts: the -inf tail is never a hypothesis
        ends = valid & (token == eos)
        rank = torch.arange(width, device=device)
        finishing = ends & (rank < k)  # EOS among the first k: a finished hypothesis
        if bool(finishing.any()):
            # Every hypothesis finishing now has t tokens + EOS: one length penalty for the step.
            # float64 division, so scores compare as Python floats would.
            norm = (top.double() / gnmt_length_penalty(t + 1, alpha)).masked_fill(~finishing, float("-inf"))
            step_best, at = norm.max(dim=1)  # the first of equal maxima, as max() over the list
            improved = finishing.any(1) & (step_best > best_score[sent])
            n_finished[sent] += finishing.sum(1)
            if bool(improved.any()):
                where = improved.nonzero().squeeze(1)
                best_score[sent[where]] = step_best[where]
                row = where * k + beam[where, at[where]]
                for b, hyp in zip(sent[where].tolist(), run.tokens[row, 1:]):
                    best[b] = hyp
        live = valid & ~ends
        n_live = live.sum(1)
        if early_stopping:
            keep = (n_finished[sent] < k) & (n_live > 0)
        else:  # the best live score over the largest length penalty still ahead (t + 2 tokens, or the maximum)
            best_live = torch.where(live, top, float("-inf")).amax(1).double()
            lp_max = torch.maximum(torch.tensor(gnmt_length_penalty(t + 2, alpha), dtype=torch.float64, device=device),
                                   gnmt_length_penalty((max_len[sent] + 1).double(), alpha))
            keep = (n_live > 0) & (best_live / lp_max > best_score[sent])
        if not bool(keep.any()):
            break
        # The first k live candidates of each kept sentence, in rank order; fewer than k (tiny
        # vocabularies): the first one again with score -inf (a dead row).
        order = torch.where(live, rank, rank + width).argsort(dim=1, stable=True)[:, :k]
        kept = keep.nonzero().squeeze(1)
        pick = order[kept]
        dead = torch.arange(k, device=device)[None, :] >= n_live[kept, None]
        pick = torch.where(dead, pick[:, :1], pick)
        rows = (kept[:, None] * k + beam[kept[:, None], pick]).view(-1)
        next_tokens = token[kept[:, None], pick].view(-1, 1)
        scores = top[kept[:, None], pick].masked_fill(dead, float("-inf"))
        same_sources = len(kept) == A
        sent = sent[kept]
        run.select(rows, same_sources)
        run.tokens = torch.cat([run.tokens, next_tokens], 1)
    return [_strip(hyp.tolist(), eos) if hyp is not None else [] for hyp in best]
