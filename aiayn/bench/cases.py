"""The registry of benchmark cases: aiayn's op against its PyTorch equivalent.

A case is a function ``(device, dtype, quick) -> Bench`` registered under a name; it builds the
inputs and returns the two callables to time (same inputs, same work) and what one call moves
and computes. Adding a case::

    @register("gelu.fwd", dtypes=(torch.float32, torch.bfloat16))
    def _(device, dtype, quick):
        x = torch.randn(3072, 2048, device=device, dtype=dtype)
        return Bench(aiayn=lambda: aiayn.functional.gelu(x), torch=lambda: F.gelu(x),
                     shape=x.shape, bytes=2 * x.nbytes)

``flops`` (floating-point operations per call, an FMA counts 2) is compared with the FLOP/s peak
of the dtype, ``bytes`` (the minimum traffic to and from memory per call) with the measured
memory bandwidth; declare whichever is meaningful, or both.
"""

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import aiayn


@dataclass
class Bench:
    aiayn: Callable[[], object]
    torch: Callable[[], object]
    shape: tuple
    flops: float | None = None
    bytes: float | None = None


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[torch.device, torch.dtype, bool], Bench]
    dtypes: tuple
    devices: tuple
    baseline: str = "torch"  # what the `torch` callable is, where it is not PyTorch's own equivalent

    @property
    def label(self):
        """The case's name in tables: with its baseline where that is not PyTorch's op."""
        return self.name if self.baseline == "torch" else f"{self.name} (vs {self.baseline})"


CASES: dict[str, Case] = {}


def register(name, dtypes=(torch.float32,), devices=("cpu", "cuda"), baseline="torch"):
    """Decorator: register ``make(device, dtype, quick) -> Bench`` as the case ``name``, run for
    each of ``dtypes`` on each of ``devices``."""

    def decorator(make):
        if name in CASES:
            raise ValueError(f"benchmark case {name!r} is already registered")
        CASES[name] = Case(name, make, tuple(dtypes), tuple(devices), baseline)
        return make

    return decorator


def select(pattern=None, device=None):
    """The registered cases whose name contains ``pattern`` as a substring or matches it as a
    regular expression (``re.search``), and that run on ``device``; all of them by default."""

    def matches(name):
        if pattern is None or pattern in name:
            return True
        try:
            return re.search(pattern, name) is not None
        except re.error:
            return False

    return [c for c in CASES.values() if matches(c.name) and (device is None or device in c.devices)]


# --- add_dropout_layer_norm: LayerNorm(residual + dropout(x)), the Transformer's sub-layer connection


def _add_dropout_layer_norm_inputs(device, dtype, requires_grad):
    T, D, p = 3072, 512, 0.1  # 3072 tokens of d_model = 512 (the base model)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=requires_grad)
    r = torch.randn(T, D, device=device, dtype=dtype, requires_grad=requires_grad)
    ln = torch.nn.LayerNorm(D, device=device, dtype=dtype)
    with torch.no_grad():  # not the identity, so the affine part does real work
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)

    def ours():
        return aiayn.functional.add_dropout_layer_norm(x, r, ln.weight, ln.bias, p=p)

    def theirs():
        return ln(r + F.dropout(x, p=p, training=True))

    return x, r, ln, ours, theirs


@register("add_dropout_layer_norm.fwd", dtypes=(torch.float32, torch.bfloat16))
def _add_dropout_layer_norm_fwd(device, dtype, quick):
    x, r, ln, ours, theirs = _add_dropout_layer_norm_inputs(device, dtype, requires_grad=False)
    return Bench(aiayn=torch.no_grad()(ours), torch=torch.no_grad()(theirs), shape=tuple(x.shape),
                 bytes=3 * x.nbytes)  # read x and residual, write out


@register("add_dropout_layer_norm.fwd_bwd", dtypes=(torch.float32, torch.bfloat16))
def _add_dropout_layer_norm_fwd_bwd(device, dtype, quick):
    x, r, ln, ours, theirs = _add_dropout_layer_norm_inputs(device, dtype, requires_grad=True)
    grad = torch.randn_like(x)
    inputs = (x, r, ln.weight, ln.bias)

    # The gradients of (out * grad).sum() w.r.t. all inputs, without the extra mul and sum kernels,
    # and returned rather than accumulated into .grad (no accumulation kernels either).
    def fwd_bwd(forward):
        return lambda: torch.autograd.grad(forward(), inputs, grad)

    # Minimum traffic: forward reads x, residual and writes out; backward reads grad, x, residual
    # (the dropout mask is regenerated from the seed) and writes grad_x, grad_residual.
    return Bench(aiayn=fwd_bwd(ours), torch=fwd_bwd(theirs), shape=tuple(x.shape), bytes=8 * x.nbytes)


# --- feed_forward: FFN(x) = dropout(relu(x W1^T + b1)) W2^T + b2, the position-wise network (§3.3)


def _feed_forward_bench(device, dtype, T, d_model, d_ff, p, backward):
    seq = torch.nn.Sequential(torch.nn.Linear(d_model, d_ff), torch.nn.ReLU(), torch.nn.Dropout(p),
                              torch.nn.Linear(d_ff, d_model)).to(device=device, dtype=dtype)
    seq.train()
    x = torch.randn(T, d_model, device=device, dtype=dtype, requires_grad=backward)
    w1, b1, w2, b2 = seq[0].weight, seq[0].bias, seq[3].weight, seq[3].bias

    def ours():
        return aiayn.functional.feed_forward(x, w1, b1, w2, b2, dropout_p=p)

    theirs = lambda: seq(x)  # noqa: E731
    flops = 2 * 2 * T * d_model * d_ff  # two GEMMs
    if not backward:
        return Bench(aiayn=torch.no_grad()(ours), torch=torch.no_grad()(theirs), shape=(T, d_model, d_ff),
                     flops=flops)
    grad = torch.randn(T, d_model, device=device, dtype=dtype)
    inputs = (x, w1, b1, w2, b2)

    def fwd_bwd(forward):
        return lambda: torch.autograd.grad(forward(), inputs, grad)

    return Bench(aiayn=fwd_bwd(ours), torch=fwd_bwd(theirs), shape=(T, d_model, d_ff), flops=3 * flops)


@register("feed_forward.fwd", dtypes=(torch.float32, torch.bfloat16))
def _feed_forward_fwd(device, dtype, quick):
    # The base model's FFN, 3072 tokens, dropout 0.1 on the hidden activation (training mode).
    return _feed_forward_bench(device, dtype, 1024 if quick else 3072, 512, 2048, 0.1, backward=False)


@register("feed_forward.fwd_bwd", dtypes=(torch.float32, torch.bfloat16))
def _feed_forward_fwd_bwd(device, dtype, quick):
    return _feed_forward_bench(device, dtype, 1024 if quick else 3072, 512, 2048, 0.1, backward=True)


@register("feed_forward.fwd_small", dtypes=(torch.float32,), devices=("cpu",))
def _feed_forward_fwd_small(device, dtype, quick):
    # Decoding-sized: 64 tokens, no dropout (inference).
    return _feed_forward_bench(device, dtype, 64, 512, 2048, 0.0, backward=False)


@register("feed_forward.fwd_small_prepacked", dtypes=(torch.float32,), devices=("cpu",))
def _feed_forward_fwd_small_prepacked(device, dtype, quick):
    # The same with the weights packed once (aiayn.packed_weight_cache: inference reuses them).
    b = _feed_forward_bench(device, dtype, 64, 512, 2048, 0.0, backward=False)
    ours = b.aiayn

    def cached():
        with aiayn.packed_weight_cache():
            return ours()

    b.aiayn = cached
    return b


@register("feed_forward.fwd_big", dtypes=(torch.float32,), devices=("cpu",))
def _feed_forward_fwd_big(device, dtype, quick):
    # The big model's FFN, 1024 -> 4096 -> 1024, 2048 tokens.
    return _feed_forward_bench(device, dtype, 512 if quick else 2048, 1024, 4096, 0.1, backward=False)


# On CUDA (issue 8's targets, H100, bf16): 16k tokens of the base and the big model's FFN, against
# torch's Linear-ReLU-Dropout-Linear; and linear + ReLU on its own.
for _name, _d_model, _d_ff in (("t16k", 512, 2048), ("big_t16k", 1024, 4096)):
    for _backward in (False, True):
        register(f"feed_forward.{'fwd_bwd' if _backward else 'fwd'}_{_name}", dtypes=(torch.bfloat16,),
                 devices=("cuda",))(
            lambda device, dtype, quick, d_model=_d_model, d_ff=_d_ff, backward=_backward: _feed_forward_bench(
                device, dtype, 4096 if quick else 16384, d_model, d_ff, 0.1, backward=backward))


@register("linear.relu_fwd", dtypes=(torch.float32, torch.bfloat16), devices=("cuda",))
def _linear_relu_fwd(device, dtype, quick):
    T, K, N = 4096 if quick else 16384, 1024, 4096
    lin = torch.nn.Linear(K, N, device=device, dtype=dtype)
    x = torch.randn(T, K, device=device, dtype=dtype)
    return Bench(aiayn=torch.no_grad()(lambda: aiayn.functional.linear(x, lin.weight, lin.bias, "relu")),
                 torch=torch.no_grad()(lambda: torch.relu(lin(x))), shape=(T, K, N), flops=2 * T * K * N)


# --- linear_int8: inference linear with int8 weights and per-row quantized activations -----------
# Baseline: PyTorch's dynamic int8 Linear (fbgemm: per-tensor u8 activations, int8 weights).


@register("linear_int8.fwd", dtypes=(torch.float32,), devices=("cpu",), baseline="torch dynamic int8")
def _linear_int8_fwd(device, dtype, quick):
    import warnings

    T, K, N = 512 if quick else 2048, 512, 2048
    lin = torch.nn.Linear(K, N)
    x = torch.randn(T, K)
    w_q, w_scale = aiayn.functional.quantize_weight_int8(lin.weight)
    packed, b = aiayn.functional.linear_int8_pack(w_q), lin.bias.detach()
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
        warnings.simplefilter("ignore")
        dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    return Bench(aiayn=lambda: aiayn.functional.linear_int8(x, w_q, w_scale, b, w_packed=packed),
                 torch=torch.no_grad()(lambda: dyn(x)), shape=(T, K, N), flops=2 * T * K * N)


# --- scaled_dot_product_attention: softmax(Q Kᵀ / √d_k) V (§3.2.1) ---------------------------


def _attention_inputs(device, dtype, B, H, Lq, Lk, D, requires_grad=False):
    def make(L):
        return torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=requires_grad)

    return make(Lq), make(Lk), make(Lk)


def _attention_flops(B, H, Lq, Lk, D, causal=False):
    # Two matrix products of 2 * Lq * Lk * D flops each; a causal mask halves the work.
    flops = 4.0 * B * H * Lq * Lk * D
    return flops / 2 if causal else flops


def _attention_case(name, B, H, L, D, dtypes=(torch.float32,), causal=False, padding=False, dropout=0.0,
                    backward=False, Lq=None, quick_L=None):
    @register(name, dtypes=dtypes)
    def _(device, dtype, quick):
        L_ = quick_L if quick and quick_L else L
        Lq_ = Lq if Lq is not None else L_
        q, k, v = _attention_inputs(device, dtype, B, H, Lq_, L_, D, requires_grad=backward)
        pad = None
        if padding:  # sentences of different lengths in a batch: the last ~20% of keys padded in half of them
            pad = torch.zeros(B, L_, dtype=torch.bool, device=device)
            pad[::2, int(L_ * 0.8):] = True
        torch_mask = None if pad is None else ~pad[:, None, None, :]

        def ours():
            return aiayn.functional.scaled_dot_product_attention(q, k, v, key_padding_mask=pad, dropout_p=dropout,
                                                                 is_causal=causal)

        def theirs():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask, dropout_p=dropout, is_causal=causal)

        flops = _attention_flops(B, H, Lq_, L_, D, causal)
        if backward:
            grad = torch.randn(B, H, Lq_, D, device=device, dtype=dtype)

            def fwd_bwd(forward):
                return lambda: torch.autograd.grad(forward(), (q, k, v), grad)

            # The backward's five products (S recomputed, dP, dV, dQ, dK) are 2.5x the forward's two.
            return Bench(aiayn=fwd_bwd(ours), torch=fwd_bwd(theirs), shape=(B, H, Lq_, L_, D), flops=3.5 * flops)
        return Bench(aiayn=torch.no_grad()(ours), torch=torch.no_grad()(theirs), shape=(B, H, Lq_, L_, D),
                     flops=flops, bytes=(q.nbytes + k.nbytes + v.nbytes + q.nbytes))


# The paper's training shape (base model, ~25k-token batches of short sentences) with key padding.
_attention_case("attention.fwd.paper_padding", B=64, H=8, L=48, D=64, padding=True)
_attention_case("attention.fwd_bwd.paper_padding_dropout", B=64, H=8, L=48, D=64, padding=True, dropout=0.1,
                backward=True)
# Long sequences.
_attention_case("attention.fwd.long", B=2, H=8, L=2048, D=64, dtypes=(torch.float32, torch.bfloat16), quick_L=512)
_attention_case("attention.fwd.long_causal", B=2, H=8, L=2048, D=64, causal=True, quick_L=512)
_attention_case("attention.fwd_bwd.long", B=2, H=8, L=2048, D=64, backward=True, quick_L=512)
# One decoding step against a KV cache (incremental decoding / beam search).
_attention_case("attention.decode", B=256, H=8, L=48, D=64, Lq=1)


# GPU shapes of issue 7 (H100 targets: bf16, d = 64, B * L = 16k tokens), each against torch's
# default SDPA and against each of its backends alone (torch.nn.attention.sdpa_kernel; a backend
# that cannot run the case is reported as skipped). TFLOP/s use FlashAttention's count (above).
_SDPA_BACKENDS = {"default": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "cudnn": "CUDNN_ATTENTION"}


def _attention_cuda_case(name, B, H, L, D, causal=False, padding=False, backward=False, Lq=None, quick_L=None):
    for label, backend in _SDPA_BACKENDS.items():
        @register(f"{name}[{label}]", dtypes=(torch.bfloat16, torch.float16), devices=("cuda",))
        def _(device, dtype, quick, backend=backend):
            L_ = quick_L if quick and quick_L else L
            Lq_ = Lq if Lq is not None else L_
            B_ = B * L // L_ if Lq is None else B  # same tokens per batch in --quick
            q, k, v = _attention_inputs(device, dtype, B_, H, Lq_, L_, D, requires_grad=backward)
            pad = None
            if padding:
                pad = torch.zeros(B_, L_, dtype=torch.bool, device=device)
                pad[::2, int(L_ * 0.8):] = True
            torch_mask = None if pad is None else ~pad[:, None, None, :]

            def ours():
                return aiayn.functional.scaled_dot_product_attention(q, k, v, key_padding_mask=pad, is_causal=causal)

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask, is_causal=causal)

            theirs = sdpa
            if backend is not None:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                kind = getattr(SDPBackend, backend, None)
                if kind is None:
                    raise NotImplementedError(f"torch has no SDPA backend {backend}")

                def sdpa_on_backend():
                    with sdpa_kernel(kind):
                        return sdpa()

                theirs = sdpa_on_backend

                try:
                    theirs()
                except RuntimeError as e:  # the backend cannot run this case (dtype, mask, GPU)
                    raise NotImplementedError(f"torch SDPA backend {backend}: {str(e).splitlines()[0]}") from e
            flops = _attention_flops(B_, H, Lq_, L_, D, causal)
            if backward:
                grad = torch.randn(B_, H, Lq_, D, device=device, dtype=dtype)

                def fwd_bwd(forward):
                    return lambda: torch.autograd.grad(forward(), (q, k, v), grad)

                return Bench(aiayn=fwd_bwd(ours), torch=fwd_bwd(theirs), shape=(B_, H, Lq_, L_, D), flops=3.5 * flops)
            return Bench(aiayn=torch.no_grad()(ours), torch=torch.no_grad()(theirs), shape=(B_, H, Lq_, L_, D),
                         flops=flops, bytes=(q.nbytes + k.nbytes + v.nbytes + q.nbytes))


_attention_cuda_case("attention.cuda.fwd.L2k", B=8, H=16, L=2048, D=64, quick_L=1024)
_attention_cuda_case("attention.cuda.fwd.L8k", B=2, H=16, L=8192, D=64, quick_L=2048)
_attention_cuda_case("attention.cuda.fwd_causal.L2k", B=8, H=16, L=2048, D=64, causal=True, quick_L=1024)
_attention_cuda_case("attention.cuda.fwd_bwd.L2k", B=8, H=16, L=2048, D=64, backward=True, quick_L=1024)
_attention_cuda_case("attention.cuda.fwd.L2k_d128", B=8, H=8, L=2048, D=128, quick_L=1024)
_attention_cuda_case("attention.cuda.fwd.paper_padding", B=512, H=8, L=48, D=64, padding=True)
_attention_cuda_case("attention.cuda.decode", B=256, H=8, L=48, D=64, Lq=1)


# --- linear_cross_entropy: the pre-softmax projection fused with the label-smoothed loss (§3.4, §5.4)


def _linear_cross_entropy_bench(device, dtype, T, d, V):
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, d, device=device) / d ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (T,), device=device)

    def ours():
        return torch.autograd.grad(aiayn.functional.linear_cross_entropy(x, w, t, label_smoothing=0.1), (x, w))

    def theirs():  # materialises the T x V logits, their log-probabilities and gradient
        return torch.autograd.grad(F.cross_entropy(F.linear(x, w), t, label_smoothing=0.1), (x, w))

    # 3 GEMMs of the logits' size: logits, dx = G W, dW = G^T x.
    return Bench(aiayn=ours, torch=theirs, shape=(T, d, V), flops=3 * 2 * T * d * V)


@register("linear_cross_entropy.fwd_bwd", dtypes=(torch.float32, torch.bfloat16))
def _linear_cross_entropy_fwd_bwd(device, dtype, quick):
    # The Multi30k training shape: ~1250 target tokens per batch, d_model 256, an 8000-token vocabulary.
    return _linear_cross_entropy_bench(device, dtype, 1250, 256, 8000)


@register("linear_cross_entropy.fwd_bwd_base", dtypes=(torch.float32,))
def _linear_cross_entropy_fwd_bwd_base(device, dtype, quick):
    # The base model's (Table 3) projection: 4096 target tokens, d_model 512, 37000 tokens (torch's
    # logits, log-probabilities and their gradient are 606 MB each in float32).
    return _linear_cross_entropy_bench(device, dtype, 1024 if quick else 4096, 512, 37000)


# --- the whole model: a training step and beam-search decoding (aiayn.nn) ----------------------


def _sentence_batch(device, B, S, vocab, pad_every=2):
    """Token ids (B, S) with the last ~25% padded in every other sentence."""
    tokens = torch.randint(3, vocab, (B, S), device=device)
    tokens[::pad_every, int(S * 0.75):] = 0
    return tokens


def _torch_transformer_model(cfg, device):
    """The same model from nn.Transformer + nn.Embedding + nn.Linear (tied weights, sqrt(d_model)
    scaling, sinusoidal positions); nn.Transformer's attention and FFN-internal dropout set to 0 so
    that dropout sits where the paper (and aiayn's model) puts it. The embedding starts as aiayn's
    does, N(0, d_model^-0.5): nn.Embedding's default N(0, 1), scaled by sqrt(d_model) and tied to the
    projection, starts with logits ~16x too large (d_model 256), and such a model trained by the
    Multi30k recipe became a fluent language model that ignored its source (val BLEU 7 after 30
    minutes), which would compare initialisations rather than implementations."""
    import math

    class TorchModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(cfg.src_vocab_size, cfg.d_model)
            torch.nn.init.normal_(self.embed.weight, 0.0, cfg.d_model ** -0.5)
            self.core = torch.nn.Transformer(cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.num_layers, cfg.d_ff,
                                             cfg.dropout, batch_first=True)
            for layer in list(self.core.encoder.layers) + list(self.core.decoder.layers):
                layer.dropout.p = 0.0
                for attn in (getattr(layer, "self_attn", None), getattr(layer, "multihead_attn", None)):
                    if attn is not None:
                        attn.dropout = 0.0
            self.generator = torch.nn.Linear(cfg.d_model, cfg.src_vocab_size, bias=False)
            self.generator.weight = self.embed.weight
            self.pe = aiayn.nn.PositionalEncoding(cfg.d_model)

        def forward(self, src, tgt):
            def emb(t):
                return F.dropout(self.embed(t) * math.sqrt(cfg.d_model) + self.pe(t.shape[1]), cfg.dropout,
                                 self.training)
            mask = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
            out = self.core(emb(src), emb(tgt), tgt_mask=mask, tgt_is_causal=True, src_key_padding_mask=src == 0,
                            tgt_key_padding_mask=tgt == 0, memory_key_padding_mask=src == 0)
            return self.generator(out)

    return TorchModel().to(device)


def _trainer_step(model, src, tgt, opt, smoothing, fused_loss):
    """One step as aiayn's Trainer takes it (aiayn.train.trainer.Trainer._loss): the fused
    projection + loss on the decoder states for aiayn, torch's projection and cross-entropy on the
    logits for the baseline (the Trainer's ``fused_loss=False``); the same optimizer for both."""
    from aiayn.train.loss import fused_label_smoothed_cross_entropy, label_smoothed_cross_entropy

    def step():
        tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
        if fused_loss:
            loss, _ = fused_label_smoothed_cross_entropy(model(src, tgt_in, return_hidden=True),
                                                         model.projection_weight, tgt_out, smoothing, 0)
        else:
            loss, _ = label_smoothed_cross_entropy(model(src, tgt_in), tgt_out, smoothing, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


@register("model.train_step.base", devices=("cpu", "cuda"), baseline="nn.Transformer, same optimizer")
def _model_train_step(device, dtype, quick):
    # The base model (Table 3), shared 37000-token vocabulary, one batch of 16 sentence pairs of
    # 32 tokens (fwd + bwd + Adam), against the same model built from nn.Transformer, each stepped
    # as aiayn's Trainer steps it (issue 21: "driven by the same Trainer"): aiayn's fused projection
    # + loss against torch's logits + cross-entropy, and for both the Trainer's optimizer (torch's
    # fused Adam, make_optimizer). Before, both ran torch.optim.Adam's default per-tensor loop,
    # ~40% of either step on the CPU (63M parameters), which hid the models' difference.
    import warnings

    from aiayn.train.schedule import make_optimizer

    B, L = (4, 16) if quick else (16, 32)
    cfg = aiayn.nn.TransformerConfig.preset("base", 37000)
    ours = aiayn.nn.Transformer(cfg).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.Transformer's note on its nested-tensor fast path
        theirs = _torch_transformer_model(cfg, device)
    src, tgt = _sentence_batch(device, B, L, 37000), _sentence_batch(device, B, L + 1, 37000)
    tgt[:, 0] = 1

    def torch_step(step=_trainer_step(theirs, src, tgt, make_optimizer(theirs.parameters()), 0.1, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nn.MultiheadAttention's note on mixed mask types
            return step()

    return Bench(aiayn=_trainer_step(ours, src, tgt, make_optimizer(ours.parameters()), 0.1, True),
                 torch=torch_step, shape=(B, L, L))


def _corpus_pairs(n, vocab, seed=0):
    """Synthetic (source, target) id pairs with Multi30k's length profile (German ~15 and English ~16
    BPE pieces per sentence at 8000 pieces, spread 4-40): the batching and padding of the real data
    without needing it."""
    import random

    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        s = min(40, max(4, int(rng.gauss(15, 5))))
        t = min(40, max(4, int(s * rng.uniform(0.8, 1.3))))
        pairs.append(([rng.randrange(4, vocab) for _ in range(s)], [rng.randrange(4, vocab) for _ in range(t)]))
    return pairs


@register("model.train_step.multi30k", dtypes=(torch.float32, torch.bfloat16), devices=("cpu",),
          baseline="nn.Transformer float32, same Trainer")
def _model_train_step_multi30k(device, dtype, quick):
    # Issue 21's end-to-end number: the Multi30k-size model (the "small" preset: 3 + 3 layers,
    # d_model 256, d_ff 1024, 4 heads, a shared 8000-piece vocabulary) trained by aiayn's Trainer on
    # 2500-token batches (fused projection + loss, fused Adam, the paper's schedule), against the
    # same model built from nn.Transformer + nn.Embedding + the tied projection driven by the same
    # Trainer (unfused loss: it has no decoder-state output) on the same batches. Both take the
    # same sequence of batches: each sample is one optimizer step. bfloat16: aiayn trains as
    # `aiayn train --bf16` does (bf16 autocast, float32 master weights), the baseline stays float32:
    # the "--bf16 >= 3.0x the nn.Transformer float32 baseline".
    import warnings

    from aiayn.train.trainer import Trainer, TrainOptions

    cfg = aiayn.nn.TransformerConfig.preset("small", 8000)
    pairs = _corpus_pairs(600 if quick else 4000, 8000)
    options = TrainOptions(max_tokens=2500, warmup=400, seed=1)
    torch.manual_seed(0)
    ours = Trainer(aiayn.nn.Transformer(cfg), pairs,
                   TrainOptions(max_tokens=2500, warmup=400, seed=1, bf16=dtype == torch.bfloat16), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.Transformer's note on its nested-tensor fast path
        model = _torch_transformer_model(cfg, device)
    model.config = cfg
    theirs = Trainer(model, pairs, options, device, fused_loss=False)
    tokens = sum(len(s) + len(t) + 2 for s, t in pairs) / max(1, len(ours._epoch_plan()))

    def torch_step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nn.MultiheadAttention's note on mixed mask types
            return theirs.train_step()

    return Bench(aiayn=ours.train_step, torch=torch_step, shape=(int(tokens), cfg.d_model, 8000))


@register("model.decode_beam4.base", devices=("cpu", "cuda"), baseline="aiayn without cache")
def _model_decode_beam4(device, dtype, quick):
    # Beam-4 decoding (the paper's §6.1 setting) of 8 sentences of 20 tokens, 30 output tokens each
    # (a random model never emits EOS, so both run to the maximum length): with the key/value cache
    # vs re-running the decoder on the whole prefix at every step (what nn.Transformer users do).
    B, S, offset = (2, 8, 4) if quick else (8, 20, 10)
    model = aiayn.nn.Transformer(aiayn.nn.TransformerConfig.preset("base", 37000)).to(device).eval()
    src = torch.randint(3, 37000, (B, S), device=device)

    def decode(use_cache):
        return lambda: model.generate(src, beam_size=4, max_len_offset=offset, use_cache=use_cache)

    return Bench(aiayn=decode(True), torch=decode(False), shape=(B, S, S + offset))


# The translate cases (engines racing on the same weights) live in their own module; importing it
# registers them here.
from .translate_cases import TRANSLATE_INPUT, Engine, Engines, translate_engines  # noqa: E402,F401
