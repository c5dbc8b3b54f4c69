"""The C++ decoder step (aiayn._C.decoder_step via aiayn/nn/decoder_step.py): the same bits as the
layers' Python forward with a KV cache, step by step, in float32, bf16, int8 and int8_bf16, post-LN and pre-LN,
with and without biases and source padding, on every ISA; beam and greedy search give the same
tokens with it on and off; it is taken only where it applies; bad calls are clear errors."""

import pytest
import torch

import aiayn
from aiayn.nn import Transformer, TransformerConfig, decoder_step


def model(seed, vocab=29, **overrides):
    torch.manual_seed(seed)
    fields = dict(num_layers=2, d_model=32, d_ff=48, num_heads=4, dropout=0.1)
    fields.update(overrides)
    m = Transformer.from_config("tiny", vocab, **fields).eval()
    with torch.no_grad():  # sharper distributions than the initialisation's, so outputs vary by input
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
            else:
                p.add_(torch.randn_like(p) * 0.1)  # non-zero biases and LayerNorm shifts
    return m


def sources(vocab=29, lengths=(6, 3, 9, 1, 5)):
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, vocab, (n,))
    return src


def prepare(m, precision):
    if precision == "float32":
        return m
    return aiayn.quantize(m, precision)


def step_tokens(m, src, steps):
    tokens = torch.randint(3, m.config.tgt_vocab_size, (src.shape[0], steps))
    tokens[:, 0] = m.config.bos_id
    return tokens


def decode_steps(m, src, tokens, cpp):
    """Logits of cached decoding steps fed with `tokens` (N, steps), and the final caches."""
    steps = tokens.shape[1]
    outs = []
    with torch.inference_mode(), decoder_step.enabled(cpp):
        mask = src == 0
        memory = m.encode(src, mask)
        cache = m.decoder.new_cache()
        for t in range(steps):
            outs.append(m.decode(tokens[:, t:t + 1], memory, mask, cache=cache, start=t).clone())
    return outs, cache


@pytest.mark.parametrize("precision", ["float32", "bf16", "int8", "int8_bf16"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_same_bits_as_the_python_layers(isa, rng_seed, precision, norm_first):
    m = prepare(model(rng_seed, norm_first=norm_first), precision)
    src = sources()
    tokens = step_tokens(m, src, 7)
    ours, cache_c = decode_steps(m, src, tokens, cpp=True)
    theirs, cache_p = decode_steps(m, src, tokens, cpp=False)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{precision} norm_first={norm_first} step {t} (seed {rng_seed})"
    for c, p in zip(cache_c, cache_p):
        n = p["self"].length
        want = torch.bfloat16 if precision in ("bf16", "int8_bf16") else torch.float32
        assert c["self"].length == n and c["self"].k.dtype == c["cross"].k.dtype == want
        assert torch.equal(c["self"].k[:n], p["self"].k[:n]) and torch.equal(c["self"].v[:n], p["self"].v[:n])


def test_no_biases_and_no_padding(rng_seed):
    m = model(rng_seed)
    for mod in m.modules():
        if isinstance(mod, aiayn.nn.MultiHeadAttention):
            mod.in_proj_bias = None
            mod.out_proj.bias = None
    src = torch.randint(3, 29, (3, 5))
    tokens = step_tokens(m, src, 5)
    ours, _ = decode_steps(m, src, tokens, cpp=True)
    theirs, _ = decode_steps(m, src, tokens, cpp=False)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("precision", ["float32", "bf16", "int8", "int8_bf16"])
@pytest.mark.parametrize("beam", [1, 4])
def test_search_tokens_are_the_same(rng_seed, precision, beam):
    """Whole searches (sentences leaving the batch, beam reorders, cache growth past 16 positions)."""
    m = prepare(model(rng_seed), precision)
    src = sources(lengths=(6, 3, 9, 1, 5, 12, 2))
    with decoder_step.enabled(True):
        ours = m.generate(src, beam_size=beam, max_len_offset=20)
    with decoder_step.enabled(False):
        theirs = m.generate(src, beam_size=beam, max_len_offset=20)
    assert ours == theirs


def test_taken_only_where_it_applies(monkeypatch, rng_seed):
    m = model(rng_seed)
    src = sources()
    calls = []
    real = aiayn._C.decoder_step
    monkeypatch.setattr(aiayn._C, "decoder_step", lambda *a: calls.append(1) or real(*a))
    decode_steps(m, src, step_tokens(m, src, 4), cpp=True)
    assert len(calls) == 3  # every step but the first (which fills the cross-attention caches)
    calls.clear()
    mask = src == 0
    with torch.no_grad():  # not inference mode: the Python layers (autograd keys would be dispatched)
        memory = m.encode(src, mask)
        cache = m.decoder.new_cache()
        for t in range(3):
            m.decode(torch.ones(src.shape[0], 1, dtype=torch.long), memory, mask, cache=cache, start=t)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        memory = m.encode(src, mask)
        cache = m.decoder.new_cache()
        for t in range(3):
            m.decode(torch.ones(src.shape[0], 1, dtype=torch.long), memory, mask, cache=cache, start=t)
    with torch.inference_mode(), aiayn.nn.reference_ops():
        m.generate(src, beam_size=2, max_len_offset=3)
    assert calls == []


def test_bad_calls_are_clear_errors():
    x = torch.randn(2, 1, 8)
    k = torch.zeros(4, 2, 2, 4)
    with pytest.raises(ValueError, match="30 parameters"):
        aiayn._C.decoder_step(x, [None] * 3, [k], [k], 0, [k], [k], None, 2, 1e-5, False, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="capacity"):
        aiayn._C.decoder_step(x, [torch.zeros(1)] * 30, [k], [k], 4, [k], [k], None, 2, 1e-5, False,
                              torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="must be \\(N, 1, d_model\\)"):
        aiayn._C.decoder_step(torch.randn(2, 3, 8), [torch.zeros(1)] * 30, [k], [k], 0, [k], [k], None, 2, 1e-5,
                              False, torch.zeros(1, dtype=torch.long))
