"""Importing nn.Transformer and nn.MultiheadAttention (aiayn.interop): same forward arguments,
same outputs (the 2x rule against torch in float64), masks in torch's conventions."""

import copy

import pytest
import torch
import torch.nn as nn

from aiayn import interop
from conftest import assert_2x_rule

# torch's own notes on its nested-tensor fast path and on mixed mask types are not about us.
pytestmark = [pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
              pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")]


def torch_transformer(batch_first, norm_first, dropout=0.0):
    return nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48,
                          dropout=dropout, batch_first=batch_first, norm_first=norm_first)


def _masks(kind, B, H, S, T):
    """(src_mask, tgt_mask, memory_mask) in torch's conventions."""
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    if kind == "float":
        return None, causal, None
    if kind == "bool":
        return None, torch.isinf(causal), torch.rand(T, S) < 0.2
    if kind == "3d":  # (N * h, L, S), bool True = not allowed; never a fully masked row
        src_mask = torch.rand(B * H, S, S) < 0.3
        src_mask[..., 0] = False
        return src_mask, causal, None
    return None, None, None


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("mask_kind", ["none", "float", "bool", "3d"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_import_matches_torch(rng_seed, norm_first, batch_first, mask_kind, mode):
    model = torch_transformer(batch_first, norm_first).train(mode == "train")
    ours = interop.from_torch_transformer(model)
    assert ours.training == model.training
    B, S, T = 3, 9, 7
    src, tgt = torch.randn(B, S, 32), torch.randn(B, T, 32)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    src_kpm = torch.zeros(B, S, dtype=torch.bool)
    src_kpm[1, 5:] = True
    tgt_kpm = torch.zeros(B, T, dtype=torch.bool)
    tgt_kpm[2, 4:] = True
    src_mask, tgt_mask, memory_mask = _masks(mask_kind, B, 4, S, T)
    args = dict(src_mask=src_mask, tgt_mask=tgt_mask, memory_mask=memory_mask, src_key_padding_mask=src_kpm,
                tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=src_kpm)
    theirs = model(src, tgt, **args)
    out = ours(src, tgt, **args)
    ref = copy.deepcopy(model).double()(src.double(), tgt.double(), **{
        k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in args.items()})
    keep = ~tgt_kpm if batch_first else ~tgt_kpm.T  # padded target rows are not compared
    assert_2x_rule(out[keep], theirs[keep], ref[keep], "nn.Transformer output", slack=1e-5, seed=rng_seed)
    if mode == "train":
        out[keep].square().sum().backward()
        theirs[keep].square().sum().backward()
        for (name, p), (_, q) in zip(ours.named_parameters(), model.named_parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name


def test_transformer_import_state_dict_loads_back():
    model = torch_transformer(True, False)
    ours = interop.from_torch_transformer(model)
    again = interop.from_torch_transformer(torch_transformer(True, False))
    again.load_state_dict(ours.state_dict())
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert ours.encoder.norm is not None and ours.decoder.norm is not None  # nn.Transformer's final norms


def test_transformer_import_rejects_gelu():
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                           activation="gelu")
    with pytest.raises(ValueError, match="relu"):
        interop.from_torch_transformer(model)
    with pytest.raises(TypeError, match="nn.Transformer"):
        interop.from_torch_transformer(nn.Linear(2, 2))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross", "self_masked", "float_kpm"])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_import_matches_torch(rng_seed, batch_first, kind, bias):
    mha = nn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first)
    ours = interop.from_torch_mha(mha)
    L, S, B = 6, 8, 2
    q = torch.randn(B, L, 32)
    kv = q if kind.startswith("self") or kind == "float_kpm" else torch.randn(B, S, 32)
    if not batch_first:
        q = q.transpose(0, 1)
        kv = q if kv.shape[1] == L and kind != "cross" else kv.transpose(0, 1)
    args = {}
    if kind == "self_masked":
        args = dict(attn_mask=torch.triu(torch.ones(L, L, dtype=torch.bool), 1),
                    key_padding_mask=torch.tensor([[False] * L, [False] * 4 + [True] * 2]))
    if kind == "float_kpm":
        args = dict(key_padding_mask=torch.randn(B, L))
    for average in (True, False):
        a, wa = mha(q, kv, kv, average_attn_weights=average, **args)
        b, wb = ours(q, kv, kv, average_attn_weights=average, **args)
        ref, wref = copy.deepcopy(mha).double()(q.double(), kv.double(), kv.double(), average_attn_weights=average,
                                                **{k: v.double() if v.is_floating_point() else v
                                                   for k, v in args.items()})
        assert_2x_rule(b, a, ref, "MHA output", slack=1e-6, seed=rng_seed)
        assert_2x_rule(wb, wa, wref, "MHA weights", slack=1e-6, seed=rng_seed)
    out, weights = ours(q, kv, kv, need_weights=False, **args)
    assert weights is None and torch.allclose(out, a, atol=1e-5)


def test_mha_import_rejects_unsupported_variants():
    with pytest.raises(ValueError, match="kdim"):
        interop.from_torch_mha(nn.MultiheadAttention(16, 2, kdim=8, vdim=8))
    with pytest.raises(ValueError, match="add_bias_kv"):
        interop.from_torch_mha(nn.MultiheadAttention(16, 2, add_bias_kv=True))
