"""The beam and greedy searches as they were before their bookkeeping became batched tensor work
(aiayn 0.1, Python loops over sentences and candidates): the references the batched searches must
match token for token."""

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


def reference_greedy_search(model, src, src_key_padding_mask=None, max_len_offset=50, use_cache=True):
    """Greedy search as it was before its bookkeeping became tensor work (aiayn 0.1: a Python loop
    over the live sentences each step)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), packed_weight_cache():
            run = _Decoder(model, src, src_key_padding_mask, max_len_offset, use_cache)
            eos = model.config.eos_id
            results = [None] * src.shape[0]
            alive = list(range(src.shape[0]))
            while alive:
                logp = run.log_probs()
                t = run.tokens.shape[1] - 1
                forced = [i for i, b in enumerate(alive) if t >= run.max_len[b]]
                if forced:
                    logp[forced] = float("-inf")
                    logp[forced, eos] = 0.0
                best = logp.argmax(-1)
                run.tokens = torch.cat([run.tokens, best[:, None]], 1)
                done = (best == eos).tolist()
                keep = []
                for i, b in enumerate(alive):
                    if done[i]:
                        results[b] = _strip(run.tokens[i, 1:].tolist(), eos)
                    else:
                        keep.append(i)
                if len(keep) < len(alive):
                    alive = [alive[i] for i in keep]
                    if keep:
                        run.select(torch.tensor(keep, device=run.tokens.device))
            return results
    finally:
        model.train(was_training)
