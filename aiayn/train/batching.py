"""Batches built by token count (§5.1: "sentence pairs were batched together by approximate sequence
length; each training batch contained ... approximately 25000 source tokens and 25000 target
tokens"), split over data-parallel ranks and into micro-batches for gradient accumulation.

A pair's length counts the end-of-sentence token on the source side and the begin/end token on the
target side (the model sees len + 1 positions on each). A batch's cost is its padded size,
sentences * (longest source + longest target)."""

import random

import torch


def pair_lengths(pairs):
    """(source positions, target positions) of each (source ids, target ids) pair."""
    return [(len(s) + 1, len(t) + 1) for s, t in pairs]


def _padded_cost(lengths, indices):
    return len(indices) * (max(lengths[i][0] for i in indices) + max(lengths[i][1] for i in indices))


def _group(lengths, order, max_tokens, min_sentences):
    """Greedy groups of consecutive `order` indices whose padded cost stays <= max_tokens (a group
    gets at least min_sentences, even over budget; a short tail joins the previous group)."""
    batches, current, max_src, max_tgt = [], [], 0, 0
    for i in order:
        s, t = lengths[i]
        grown_src, grown_tgt = max(max_src, s), max(max_tgt, t)
        if len(current) >= min_sentences and (len(current) + 1) * (grown_src + grown_tgt) > max_tokens:
            batches.append(current)
            current, grown_src, grown_tgt = [], s, t
        current.append(i)
        max_src, max_tgt = grown_src, grown_tgt
    if current:
        if len(current) < min_sentences and batches:
            batches[-1].extend(current)
        else:
            batches.append(current)
    return batches


def token_batches(lengths, max_tokens, *, seed=0, epoch=0, min_sentences=1):
    """One epoch's batches: lists of pair indices, sentences of similar length together, each about
    `max_tokens` padded source + target tokens, in a shuffled order that depends only on
    (seed, epoch) (so every rank, and a resumed run, builds the same plan)."""
    if max_tokens < 1:
        raise ValueError(f"token_batches: max_tokens must be >= 1, got {max_tokens}")
    if len(lengths) < min_sentences:
        raise ValueError(f"token_batches: {len(lengths)} sentence pairs cannot fill batches of at least "
                         f"{min_sentences} (one per data-parallel rank)")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)  # random tie-break among equal lengths, then a stable sort by length
    order.sort(key=lambda i: (lengths[i][0], lengths[i][1]))
    batches = _group(lengths, order, max_tokens, min_sentences)
    rng.shuffle(batches)
    return batches


def shard(batch, lengths, rank, world_size):
    """The part of a batch that data-parallel rank `rank` trains on: sorted by length, dealt out
    round-robin so that every rank gets a similar number of tokens."""
    ordered = sorted(batch, key=lambda i: (lengths[i][0], lengths[i][1]))
    return ordered[rank::world_size]


def micro_batches(indices, lengths, max_tokens):
    """Consecutive pieces of `indices` (kept in order) each within `max_tokens` padded tokens: one
    forward/backward each, their gradients accumulated."""
    ordered = sorted(indices, key=lambda i: (lengths[i][0], lengths[i][1]))
    return _group(lengths, ordered, max_tokens, 1)


def collate(pairs, pad_id, bos_id, eos_id, device=None):
    """Padded tensors of (source ids, target ids) pairs: source + [eos], [bos] + target (decoder
    input), target + [eos] (what the decoder must predict). All (B, L) int64."""
    src_len = max(len(s) for s, _ in pairs) + 1
    tgt_len = max(len(t) for _, t in pairs) + 1
    src = torch.full((len(pairs), src_len), pad_id, dtype=torch.long)
    tgt_in = torch.full((len(pairs), tgt_len), pad_id, dtype=torch.long)
    tgt_out = torch.full((len(pairs), tgt_len), pad_id, dtype=torch.long)
    for row, (s, t) in enumerate(pairs):
        src[row, :len(s) + 1] = torch.tensor(list(s) + [eos_id])
        tgt_in[row, :len(t) + 1] = torch.tensor([bos_id] + list(t))
        tgt_out[row, :len(t) + 1] = torch.tensor(list(t) + [eos_id])
    if device is not None:
        src, tgt_in, tgt_out = src.to(device), tgt_in.to(device), tgt_out.to(device)
    return src, tgt_in, tgt_out
