"""The beam search as it was before it became batched tensor work (aiayn 0.1, a Python loop over
sentences and candidates): the reference the batched search must match token for token."""

import torch

from aiayn import packed_weight_cache
from aiayn.decoding import _Decoder, _strip, gnmt_length_penalty


def reference_beam_search(model, src, src_key_padding_mask=None, beam_size=4, length_penalty=0.6,
                          max_len_offset=50, use_cache=True):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), packed_weight_cache():
            return _beam_search(model, src, src_key_padding_mask, beam_size, length_penalty, max_len_offset,
                                use_cache)
    finally:
        model.train(was_training)


def _beam_search(model, src, src_key_padding_mask, k, alpha, max_len_offset, use_cache):
    run = _Decoder(model, src, src_key_padding_mask, max_len_offset, use_cache)
    eos = model.config.eos_id
    device = run.tokens.device
    B = src.shape[0]
    run.expand(k)
    finished = [[] for _ in range(B)]
    alive = list(range(B))  # sentence of each block of k rows
    scores = torch.full((B, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all k rows start identical: extend only the first
    while alive:
        logp = run.log_probs()
        V = logp.shape[-1]
        t = run.tokens.shape[1] - 1
        for i, b in enumerate(alive):
            if t >= run.max_len[b]:
                rows = logp[i * k:(i + 1) * k]
                rows[:] = float("-inf")
                rows[:, eos] = 0.0
        cand = (scores[:, :, None] + logp.view(len(alive), k, V)).view(len(alive), k * V)
        top, index = (x.cpu() for x in cand.topk(min(2 * k, k * V), dim=-1))
        prev_tokens = run.tokens.cpu()
        rows, next_tokens, next_scores, keep = [], [], [], []
        for i, b in enumerate(alive):
            lives = []
            for rank, (score, flat) in enumerate(zip(top[i].tolist(), index[i].tolist())):
                if score == float("-inf"):
                    break
                beam, token = divmod(flat, V)
                if token == eos:
                    if rank < k:
                        hyp = prev_tokens[i * k + beam, 1:].tolist()
                        finished[b].append((score / gnmt_length_penalty(len(hyp) + 1, alpha), hyp))
                elif len(lives) < k:
                    lives.append((i * k + beam, token, score))
            if len(finished[b]) >= k or not lives:
                continue
            while len(lives) < k:  # fewer live candidates than beams (tiny vocabularies): dead rows
                lives.append((lives[0][0], lives[0][1], float("-inf")))
            keep.append(b)
            for row, token, score in lives:
                rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        same_sources = len(keep) == len(alive)
        alive = keep
        if not alive:
            break
        run.select(torch.tensor(rows, device=device), same_sources)
        run.tokens = torch.cat([run.tokens, torch.tensor(next_tokens, device=device)[:, None]], 1)
        scores = torch.tensor(next_scores, device=device).view(len(alive), k)
    return [_strip(max(f, key=lambda h: h[0])[1], eos) if f else [] for f in finished]
