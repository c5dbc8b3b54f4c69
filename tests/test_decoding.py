"""Greedy and beam search (aiayn.decoding): cached vs uncached decoding, beam 1 vs greedy, GNMT's
length penalty, maximum lengths, batches of sentences of different lengths."""

import math

import pytest
import torch

from aiayn import decoding
from aiayn.nn import Transformer, TransformerConfig


def model64(seed, vocab=23, **overrides):
    """A random tiny model in float64: cached and uncached decoding then agree to ~1e-15, so no
    near-tie can flip a token between them."""
    torch.manual_seed(seed)
    fields = dict(num_layers=2, d_model=32, d_ff=48, num_heads=4, dropout=0.1)
    fields.update(overrides)
    m = Transformer.from_config("tiny", vocab, **fields).double()
    with torch.no_grad():  # sharper distributions than the initialisation's, so outputs vary by input
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return m


def favour_eos(m, offset):
    """Make EOS compete with the best token (its logit = the best logit - offset + half its own), so
    hypotheses end at different, input-dependent steps."""
    def project(x):
        logits = Transformer.project(m, x)
        eos = logits[..., 2] * 0.5 + logits.amax(-1) - offset
        return torch.cat([logits[..., :2], eos[..., None], logits[..., 3:]], -1)
    m.project = project
    return m


def sources(vocab=23, lengths=(6, 3, 9, 1)):
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, vocab, (n,))
    return src


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: decoding on CUDA was not run on a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eos_offset", [None, 1.0, 2.0])
@pytest.mark.parametrize("beam_size", [1, 4])
def test_cached_and_uncached_decoding_give_the_same_tokens(rng_seed, beam_size, eos_offset, device):
    m = model64(rng_seed).to(device)
    if eos_offset is not None:
        favour_eos(m, eos_offset)
    src = sources().to(device)
    cached = m.generate(src, beam_size=beam_size, max_len_offset=6, use_cache=True)
    uncached = m.generate(src, beam_size=beam_size, max_len_offset=6, use_cache=False)
    assert cached == uncached
    assert m.training  # generate restores the mode


@pytest.mark.parametrize("eos_offset", [None, 1.0])
def test_beam_one_equals_greedy(rng_seed, eos_offset):
    m = model64(rng_seed)
    if eos_offset is not None:
        favour_eos(m, eos_offset)
    src = sources()
    assert decoding.beam_search(m, src, beam_size=1, max_len_offset=6) == decoding.greedy_search(m, src, max_len_offset=6)


@pytest.mark.parametrize("eos_offset", [None, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("max_len_offset", [0, 3, 8])
def test_greedy_search_matches_the_loop_reference(rng_seed, eos_offset, max_len_offset):
    """Token for token the greedy loop of aiayn 0.1 (tests/reference_beam_search.py): rows ending
    at different steps, forced EOS at the maximum length, sentences of different lengths."""
    from reference_beam_search import reference_greedy_search

    m = model64(rng_seed)
    if eos_offset is not None:
        favour_eos(m, eos_offset)
    src = sources(lengths=(6, 3, 9, 1, 4, 7, 2, 5))
    ours = decoding.greedy_search(m, src, max_len_offset=max_len_offset)
    assert ours == reference_greedy_search(m, src, max_len_offset=max_len_offset)
    assert all(len(h) <= n + max_len_offset for h, n in zip(ours, (6, 3, 9, 1, 4, 7, 2, 5)))


def test_batch_decoding_equals_one_sentence_at_a_time(rng_seed):
    m = favour_eos(model64(rng_seed), 1.5)
    src = sources()
    together = m.generate(src, beam_size=3, max_len_offset=5)
    for i in range(src.shape[0]):
        n = int((src[i] != 0).sum())
        assert m.generate(src[i:i + 1, :n], beam_size=3, max_len_offset=5) == [together[i]]


def test_outputs_respect_max_length_and_special_ids(rng_seed):
    m = model64(rng_seed)
    src = sources()
    for beam in (1, 4):
        out = m.generate(src, beam_size=beam, max_len_offset=4)
        for i, tokens in enumerate(out):
            assert len(tokens) <= int((src[i] != 0).sum()) + 4
            assert not {0, 1, 2} & set(tokens)
    zero = m.generate(src, beam_size=2, max_len_offset=0)
    assert all(len(t) <= int((src[i] != 0).sum()) for i, t in enumerate(zero))


def test_gnmt_length_penalty_formula():
    assert decoding.gnmt_length_penalty(1, 0.6) == 1.0
    assert decoding.gnmt_length_penalty(7, 0.6) == pytest.approx((12 / 6) ** 0.6)
    assert decoding.gnmt_length_penalty(10, 0.0) == 1.0


class ScriptedModel:
    """A stand-in whose next-token distribution depends on the prefix only: after BOS, EOS 0.45,
    token 3 0.40, token 4 0.15; after anything else EOS 0.9, 3 and 4 0.05 each."""

    def __init__(self):
        self.config = TransformerConfig.preset("tiny", 5)
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def eval(self):
        self.train(False)

    def _padding_mask(self, tokens, mask):
        return tokens == 0 if mask is None else mask

    def encode(self, src, mask):
        return torch.zeros(src.shape[0], src.shape[1], 1)

    def decode(self, tgt_in, memory, src_key_padding_mask=None, tgt_key_padding_mask=None, cache=None, start=0):
        assert cache is None
        first = torch.tensor([1e-9, 1e-9, 0.45, 0.40, 0.15]).log()
        later = torch.tensor([1e-9, 1e-9, 0.90, 0.05, 0.05]).log()
        last = first.expand(tgt_in.shape[0], 5) if tgt_in.shape[1] == 1 else later.expand(tgt_in.shape[0], 5)
        return last[:, None, :].expand(tgt_in.shape[0], tgt_in.shape[1], 5).clone()


class LengthScriptedModel(ScriptedModel):
    """Its next-token distribution depends on the number of tokens generated so far: before 4,
    token 3 0.7, EOS 0.2, token 4 0.1 (EOS is the best alternative at every step); from 4 on, EOS
    0.95. The best hypothesis is [3, 3, 3, 3]; fairseq's count with beam 2 stops after two steps
    holding only [] and [3]."""

    def decode(self, tgt_in, memory, src_key_padding_mask=None, tgt_key_padding_mask=None, cache=None, start=0):
        assert cache is None
        early = torch.tensor([1e-9, 1e-9, 0.2, 0.7, 0.1]).log()
        late = torch.tensor([1e-9, 1e-9, 0.95, 0.025, 0.025]).log()
        last = (early if tgt_in.shape[1] <= 4 else late).expand(tgt_in.shape[0], 5)
        return last[:, None, :].expand(tgt_in.shape[0], tgt_in.shape[1], 5).clone()


def test_early_stopping_false_searches_on_until_nothing_can_win():
    model = LengthScriptedModel()
    src = torch.tensor([[3, 4], [4, 3]])
    assert decoding.beam_search(model, src, beam_size=2, max_len_offset=6, use_cache=False) == [[], []]
    exact = decoding.beam_search(model, src, beam_size=2, max_len_offset=6, use_cache=False, early_stopping=False)
    assert exact == [[3, 3, 3, 3], [3, 3, 3, 3]]
    assert decoding.generate(model, src, beam_size=2, max_len_offset=6, use_cache=False,
                             early_stopping=False) == exact
    with pytest.raises(ValueError, match="early_stopping"):
        decoding.generate(model, src, beam_size=2, early_stopping="never")


@pytest.mark.parametrize("eos_offset", [None, 0.5, 1.5])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.2])
def test_early_stopping_false_never_scores_lower(rng_seed, eos_offset, alpha):
    """On random float64 models: the bound rule's hypothesis scores at least as well (GNMT score,
    recomputed by teacher forcing; a forced EOS at the maximum length costs nothing, as in the
    search) as fairseq's count rule's, sentence by sentence."""
    m = model64(rng_seed)
    if eos_offset is not None:
        favour_eos(m, eos_offset)
    src = sources()
    fast = decoding.beam_search(m, src, beam_size=3, length_penalty=alpha, max_len_offset=5)
    exact = decoding.beam_search(m, src, beam_size=3, length_penalty=alpha, max_len_offset=5, early_stopping=False)

    def score(i, hyp):
        tgt = torch.tensor([[1] + hyp + [2]])
        mask = src[i:i + 1] == 0
        with torch.no_grad():
            m.eval()
            logp = torch.log_softmax(m.decode(tgt[:, :-1], m.encode(src[i:i + 1], mask), mask).double(), -1)
            m.train()
        terms = logp[0].gather(1, tgt[0, 1:, None])[:, 0]
        if len(hyp) >= int((src[i] != 0).sum()) + 5:  # at the maximum length EOS is forced, at no cost
            terms = terms[:-1]
        return terms.sum().item() / decoding.gnmt_length_penalty(len(hyp) + 1, alpha)

    for i, (a, b) in enumerate(zip(fast, exact)):
        assert score(i, b) >= score(i, a) - 1e-9, (i, a, b)


def test_length_penalty_ranks_as_gnmt_says():
    """Short hypothesis [EOS]: log 0.45, lp 1. Long [3, EOS]: log 0.36, lp (7/6)^alpha. The long one
    wins only where log 0.36 / (7/6)^alpha > log 0.45, i.e. alpha > ~1.55."""
    model = ScriptedModel()
    src = torch.tensor([[3, 4]])
    threshold = math.log(math.log(0.36) / math.log(0.45)) / math.log(7 / 6)
    for alpha in (0.0, 0.6, 1.4):
        assert alpha < threshold and decoding.beam_search(model, src, beam_size=2, length_penalty=alpha, use_cache=False) == [[]]
    for alpha in (1.7, 2.0):
        assert alpha > threshold and decoding.beam_search(model, src, beam_size=2, length_penalty=alpha, use_cache=False) == [[3]]


def test_generate_rejects_bad_arguments():
    m = model64(0)
    with pytest.raises(ValueError, match="beam_size"):
        m.generate(sources(), beam_size=0)
    with pytest.raises(ValueError, match="'src'"):
        m.generate(torch.randn(2, 3))
    with pytest.raises(ValueError, match="max_len_offset"):
        m.generate(sources(), max_len_offset=-1)
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        m.generate(sources(), src_key_padding_mask=torch.zeros(1, 2, dtype=torch.bool))


# -- the batched search against the loop it replaced ---------------------------------------------

@pytest.mark.parametrize("beam_size,vocab,eos_offset,max_len_offset", [
    (4, 23, None, 6), (4, 23, 1.0, 6), (3, 23, 1.5, 2), (5, 23, 0.5, 8), (2, 23, 2.0, 0),
    (4, 5, 1.0, 6),  # 5 tokens, 3 of them special: fewer live candidates than beams (dead rows)
    (6, 4, None, 3),  # 4 tokens: k * V < 2k candidates
])
def test_batched_beam_search_matches_the_loop_reference(rng_seed, beam_size, vocab, eos_offset, max_len_offset):
    """Token for token the search of aiayn 0.1 (tests/reference_beam_search.py): same candidates,
    finished hypotheses, early stopping, forced EOS at the maximum length, dead rows, sentences
    leaving the batch."""
    from reference_beam_search import reference_beam_search

    m = model64(rng_seed, vocab=vocab)
    if eos_offset is not None:
        favour_eos(m, eos_offset)
    src = sources(vocab, lengths=(6, 3, 9, 1, 4, 7, 2, 5))
    ours = decoding.beam_search(m, src, beam_size=beam_size, max_len_offset=max_len_offset)
    ref = reference_beam_search(m, src, beam_size=beam_size, max_len_offset=max_len_offset)
    assert ours == ref


def test_batched_beam_search_matches_the_reference_on_a_float32_model(rng_seed):
    """float32 with aiayn's kernels and the packed-weight cache, batch 12, beam 4."""
    from reference_beam_search import reference_beam_search

    m = favour_eos(model64(rng_seed, vocab=40).float(), 1.0)
    src = sources(40, lengths=(11, 3, 9, 1, 14, 7, 2, 5, 8, 8, 6, 12))
    assert decoding.beam_search(m, src, beam_size=4, max_len_offset=10) == \
        reference_beam_search(m, src, beam_size=4, max_len_offset=10)


def test_kv_cache_reorder_gathers_the_filled_prefix():
    """reorder's double buffer: after appends, reorders (with repeated and dropped rows) and a
    growth of the buffer, the cache holds exactly what index_select on the full history gives."""
    from aiayn.nn import KVCache

    cache, k_all, v_all = KVCache(), [], []
    rows = torch.arange(6)
    for step in range(40):
        k, v = torch.randn(6, 2, 1, 3), torch.randn(6, 2, 1, 3)
        k_all, v_all = [*k_all, k], [*v_all, v]
        ck, cv = cache.append(k, v)
        assert torch.equal(ck, torch.cat(k_all, 2)) and torch.equal(cv, torch.cat(v_all, 2))
        if step % 3 != 2:
            index = torch.randint(0, 6, (6,))
            cache.reorder(index)
            k_all = [t.index_select(0, index) for t in k_all]
            v_all = [t.index_select(0, index) for t in v_all]
    assert cache.length == 40 and rows.numel() == 6
