"""The Transformer modules (aiayn.nn): configuration, parameter counts, embeddings and positions,
gradients against the same model on the reference ops, torch.compile, safetensors files."""

import copy
import math

import pytest
import torch

import aiayn
from aiayn.nn import (MultiHeadAttention, PositionalEncoding, Transformer, TransformerConfig, reference_ops,
                      uses_compiled_ops)
from conftest import assert_2x_rule


def tiny(vocab=41, **overrides):
    fields = dict(num_layers=2, d_model=32, d_ff=72, num_heads=4, dropout=0.0)
    fields.update(overrides)
    return Transformer.from_config("tiny", vocab, **fields)


def batch(vocab=41, B=3, S=9, T=7, pad_id=0):
    """Source/target ids with ragged lengths (padding at the end), never containing pad elsewhere."""
    src = torch.randint(3, vocab, (B, S))
    tgt = torch.randint(3, vocab, (B, T))
    tgt[:, 0] = 1
    for b in range(B):
        src[b, S - b * 2:] = pad_id
        tgt[b, T - b:] = pad_id
    return src, tgt


def analytic_params(N, d, d_ff, vocab):
    attn = 4 * (d * d + d)
    ffn = d * d_ff + d_ff + d_ff * d + d
    ln = 2 * d
    return vocab * d + N * (attn + ffn + 2 * ln) + N * (2 * attn + ffn + 3 * ln)


@pytest.mark.parametrize("preset,approx", [("base", 63.1e6), ("big", 214e6)])
def test_parameter_count_matches_formula(preset, approx):
    cfg = TransformerConfig.preset(preset, 37000)
    with torch.device("meta"):
        model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())  # parameters() lists the shared embedding once
    assert n == analytic_params(cfg.num_layers, cfg.d_model, cfg.d_ff, 37000)
    assert abs(n - approx) / approx < 0.002


def test_presets_follow_table_3():
    base, big = TransformerConfig.preset("base"), TransformerConfig.preset("big")
    assert (base.num_layers, base.d_model, base.d_ff, base.num_heads, base.d_k, base.dropout, base.label_smoothing) \
        == (6, 512, 2048, 8, 64, 0.1, 0.1)
    assert (big.num_layers, big.d_model, big.d_ff, big.num_heads, big.d_k, big.dropout) == (6, 1024, 4096, 16, 64, 0.3)
    assert base.share_embeddings and not base.norm_first
    assert TransformerConfig.from_dict(base.to_dict()) == base
    assert TransformerConfig.from_json(big.to_json()) == big
    assert Transformer.from_config("base", 100, num_layers=1).config.num_layers == 1


@pytest.mark.parametrize("bad,match", [
    (dict(d_model=30, num_heads=4), "divisible"),
    (dict(num_layers=0), "num_layers"),
    (dict(dropout=1.5), "dropout"),
    (dict(src_vocab_size=10, tgt_vocab_size=12), "share_embeddings"),
    (dict(eos_id=99), "eos_id"),
])
def test_config_errors_name_the_field(bad, match):
    fields = dict(TransformerConfig.preset("tiny", 50).to_dict(), **bad)
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**fields)
    with pytest.raises(ValueError, match="unknown preset"):
        TransformerConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown field"):
        TransformerConfig.preset("tiny", 50, heads=3)


def test_positional_encoding_interleaves_sin_cos_and_extends():
    d = 10
    pe = PositionalEncoding(d, max_len=4)
    table = pe(9).double()  # longer than the cache: extended on demand
    for pos in (0, 3, 8):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.equal(pe(3, start=5), PositionalEncoding(d, 64)(8)[5:])
    assert PositionalEncoding(7)(5).shape == (5, 7)  # odd width


def test_shared_embeddings_are_one_matrix():
    m = tiny()
    assert m.src_embed.weight is m.tgt_embed.weight and m.generator is None
    assert sum(1 for _ in m.parameters()) == len({id(p) for p in m.parameters()})
    x = torch.randn(2, 3, 32)
    assert torch.allclose(m.project(x), x @ m.src_embed.weight.T, atol=1e-5)
    sep = Transformer.from_config("tiny", 41, 43, share_embeddings=False)
    assert sep.src_embed is not sep.tgt_embed and sep.generator.weight.shape == (43, 64)


def test_post_ln_by_default_and_pre_ln_option():
    m = tiny()
    assert m.encoder.norm is None and m.decoder.norm is None  # the paper: no final LayerNorm
    pre = tiny(norm_first=True)
    assert pre.encoder.norm is not None and pre.decoder.layers[0].sublayer[0].norm_first


def test_forward_shapes_and_padding_masks(rng_seed):
    m = tiny().eval()
    src, tgt = batch()
    logits = m(src, tgt)
    assert logits.shape == (3, 7, 41) and torch.isfinite(logits).all()
    explicit = m(src, tgt, src_key_padding_mask=src == 0, tgt_key_padding_mask=tgt == 0)
    assert torch.equal(logits, explicit)
    # Changing a padded source token changes nothing: padding is masked out of attention.
    src2 = src.clone()
    src2[2, -1] = 5
    assert torch.allclose(m(src2, tgt, src_key_padding_mask=src == 0), logits, atol=1e-6)


def test_self_attention_passes_strided_views_without_copies(monkeypatch):
    seen = []
    real = aiayn.nn.backend.attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(aiayn.nn.backend, "attention", spy)
    mha = MultiHeadAttention(32, 4)
    mha(torch.randn(2, 5, 32))
    q, k, v = seen[0]
    assert not q.is_contiguous() and q.stride(-1) == 1
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()


def test_dropout_reproducible_and_off_in_eval(rng_seed):
    m = tiny(dropout=0.3)
    src, tgt = batch()
    torch.manual_seed(rng_seed)
    a = m(src, tgt)
    torch.manual_seed(rng_seed)
    b = m(src, tgt)
    assert torch.equal(a, b)
    assert not torch.equal(a, m(src, tgt))
    m.eval()
    assert torch.equal(m(src, tgt), m(src, tgt))


def _loss_and_grads(model, src, tgt):
    model.zero_grad()
    logits = model(src, tgt)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                             ignore_index=0)
    loss.backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm_first", [False, True])
def test_gradients_match_reference_op_model(rng_seed, norm_first):
    """The whole model on aiayn's kernels vs the same model on the pure-PyTorch reference ops,
    both measured against the reference in float64 (the 2x rule)."""
    m = tiny(norm_first=norm_first)
    src, tgt = batch()
    assert uses_compiled_ops("cpu")
    ours_out, ours = _loss_and_grads(m, src, tgt)
    with reference_ops():
        theirs_out, theirs = _loss_and_grads(m, src, tgt)
        ref_out, ref = _loss_and_grads(copy.deepcopy(m).double(), src, tgt)
    assert_2x_rule(ours_out, theirs_out, ref_out, "logits", slack=1e-5, seed=rng_seed)
    for name in ref:
        assert_2x_rule(ours[name], theirs[name], ref[name], f"grad {name}", slack=1e-5, seed=rng_seed)


def test_bf16_autocast_runs_and_stays_close():
    m = tiny().eval()
    src, tgt = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(src, tgt)
    assert low.dtype == torch.bfloat16
    high = m(src, tgt)
    assert (low.float() - high).abs().max() < 0.05 * high.abs().max() + 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.train()
        m(src, tgt).float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_torch_compile_fullgraph_forward_and_backward():
    m = tiny()
    src, tgt = batch()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out = compiled(src, tgt)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    torch.manual_seed(0)
    m(src, tgt).sum().backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5, rtol=1e-4), n


def test_state_dict_and_safetensors_round_trip(tmp_path):
    m = tiny(dropout=0.1)
    again = tiny(dropout=0.1)
    again.load_state_dict(m.state_dict())
    for (n, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    path = tmp_path / "model.safetensors"
    m.save(path)
    loaded = Transformer.load(path)
    assert loaded.config == m.config
    assert loaded.src_embed.weight is loaded.tgt_embed.weight
    for (n, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_load_rejects_missing_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="no such file"):
        Transformer.load(path)
    tiny().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Transformer.load(path)
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Transformer.load(path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no aiayn config"):
        Transformer.load(path)


def test_rejects_non_config():
    with pytest.raises(TypeError, match="TransformerConfig"):
        Transformer({"d_model": 8})
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)
