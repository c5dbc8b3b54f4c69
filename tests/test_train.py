"""Training (aiayn.train): the §5.3 schedule, label-smoothed loss against a reference formula,
token-budget batching, exact resume, checkpoint averaging and data-parallel equivalence (2 gloo
processes vs one process with the combined batch)."""

import math
import os

import pytest
import torch

from aiayn.data import synthetic_pairs
from aiayn.errors import UserInputError
from aiayn.nn import Transformer, TransformerConfig
from aiayn.train import (NoamLR, Trainer, TrainOptions, collate, label_smoothed_cross_entropy, make_optimizer,
                         micro_batches, noam_lr, pair_lengths, shard, token_batches)
from aiayn.train.checkpoint import (average_checkpoints, checkpoint_steps, load_model, load_state, model_path,
                                    state_path)
from aiayn.train.loop import fit, write_checkpoint


def small_config(**overrides):
    fields = dict(num_layers=1, d_model=32, d_ff=64, num_heads=2, dropout=0.1, max_len=64)
    fields.update(overrides)
    return TransformerConfig.preset("tiny", 13, 13, **fields)


# -- schedule (§5.3) -----------------------------------------------------------------------------

def test_noam_lr_known_values():
    # warm-up is linear, the peak is at step = warmup, then it decays as step^-0.5
    assert noam_lr(1, 512, 4000) == pytest.approx(512 ** -0.5 * 4000 ** -1.5, rel=1e-12)
    assert noam_lr(4000, 512, 4000) == pytest.approx(6.987712429686844e-04, rel=1e-12)
    assert noam_lr(2000, 512, 4000) == pytest.approx(noam_lr(4000, 512, 4000) / 2, rel=1e-12)
    assert noam_lr(16000, 512, 4000) == pytest.approx(noam_lr(4000, 512, 4000) / 2, rel=1e-12)
    assert noam_lr(100, 1024, 50) == pytest.approx(1024 ** -0.5 * 100 ** -0.5, rel=1e-12)
    with pytest.raises(ValueError, match="step"):
        noam_lr(0, 512)


def test_noam_scheduler_drives_adam_and_round_trips():
    p = torch.nn.Parameter(torch.randn(3))
    opt = make_optimizer([p])
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-9
    sched = NoamLR(opt, d_model=64, warmup=10, scale=2.0)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.randn(3)
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * noam_lr(n, 64, 10) for n in range(1, 26)], rel=1e-12)
    opt2 = make_optimizer([p])
    sched2 = NoamLR(opt2, d_model=64, warmup=10, scale=2.0)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(2.0 * noam_lr(26, 64, 10), rel=1e-12)


# -- label-smoothed cross-entropy (§5.4) ---------------------------------------------------------

def reference_ls_loss(logits, target, eps, pad):
    """sum over non-pad positions of -sum_v q(v) log p(v), q = (1 - eps) onehot + eps / V, float64."""
    lp = torch.log_softmax(logits.double(), -1)
    V = logits.shape[-1]
    total = nll = 0.0
    for pos in zip(*torch.nonzero(target != pad, as_tuple=True)):
        q = torch.full((V,), eps / V, dtype=torch.float64)
        q[target[pos]] += 1 - eps
        total += -(q * lp[pos]).sum()
        nll += -lp[pos][target[pos]]
    return total, nll


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_loss_matches_reference(eps):
    logits = torch.randn(3, 7, 11) * 3
    target = torch.randint(1, 11, (3, 7))
    target[0, 5:] = 0
    target[2, 1:] = 0
    loss, nll = label_smoothed_cross_entropy(logits, target, eps, ignore_index=0)
    ref_loss, ref_nll = reference_ls_loss(logits, target, eps, 0)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert nll.item() == pytest.approx(ref_nll.item(), rel=1e-5)
    torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), ignore_index=0,
                                                   label_smoothing=eps, reduction="sum")
    assert loss.item() == pytest.approx(torch_loss.item(), rel=1e-5)
    # gradient too: the loss computes in float32 whatever the input dtype, so against the float64
    # reference it gets float32 rounding (the gradient entries are probabilities, O(1))
    x = logits.double().requires_grad_()
    label_smoothed_cross_entropy(x, target, eps, 0)[0].backward()
    y = logits.double().requires_grad_()
    reference_ls_loss(y, target, eps, 0)[0].backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    assert x.grad[target == 0].abs().max() == 0  # padding positions get no gradient


def test_label_smoothed_loss_bad_input():
    with pytest.raises(ValueError, match="logits"):
        label_smoothed_cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), 0.1, 0)
    with pytest.raises(ValueError, match="epsilon"):
        label_smoothed_cross_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), 1.0, 0)


# -- batching (§5.1) -----------------------------------------------------------------------------

def test_token_batches_cover_epoch_within_budget():
    pairs = synthetic_pairs("copy", 500, max_len=30, seed=3)
    lengths = pair_lengths(pairs)
    batches = token_batches(lengths, 600, seed=1, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(pairs)))
    for b in batches:
        cost = len(b) * (max(lengths[i][0] for i in b) + max(lengths[i][1] for i in b))
        assert cost <= 600 or len(b) == 1
        # similar lengths grouped: spread of source lengths within a batch is small
        assert max(lengths[i][0] for i in b) - min(lengths[i][0] for i in b) <= 3
    assert batches == token_batches(lengths, 600, seed=1, epoch=0)
    assert batches != token_batches(lengths, 600, seed=1, epoch=1)
    # shards split a batch disjointly and completely; micro-batches stay within their budget
    b = max(batches, key=len)
    shards = [shard(b, lengths, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == sorted(b)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for piece in micro_batches(b, lengths, 100):
        assert len(piece) * (max(lengths[i][0] for i in piece) + max(lengths[i][1] for i in piece)) <= 100
    assert token_batches(lengths[:5], 10_000, min_sentences=2)[0] and all(
        len(x) >= 2 for x in token_batches(lengths[:5], 10, min_sentences=2))


def test_collate_layout():
    src, tgt_in, tgt_out = collate([([5, 6, 7], [8]), ([9], [4, 5, 6])], pad_id=0, bos_id=1, eos_id=2)
    assert src.tolist() == [[5, 6, 7, 2], [9, 2, 0, 0]]
    assert tgt_in.tolist() == [[1, 8, 0, 0], [1, 4, 5, 6]]
    assert tgt_out.tolist() == [[8, 2, 0, 0], [4, 5, 6, 2]]


# -- trainer, resume, averaging ------------------------------------------------------------------

PAIRS = synthetic_pairs("reverse", 400, max_len=12, seed=5)
OPTIONS = TrainOptions(max_tokens=600, micro_tokens=250, warmup=5, lr_scale=1.0, clip_norm=1.0, seed=3)


def _new_trainer(seed=0, options=OPTIONS, **config):
    torch.manual_seed(seed)
    return Trainer(Transformer(small_config(**config)), PAIRS, options)


def test_training_reduces_loss_and_reports():
    trainer = _new_trainer()
    stats = [trainer.train_step() for _ in range(12)]
    assert stats[-1]["step"] == 12 and stats[0]["lr"] == pytest.approx(noam_lr(1, 32, 5))
    assert all(math.isfinite(s["loss"]) and s["grad_norm"] is not None for s in stats)
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert stats[0]["tokens"] <= 600 and stats[0]["nll"] < stats[0]["loss"] + 1


def test_bf16_autocast_step():
    trainer = _new_trainer(options=TrainOptions(max_tokens=600, warmup=5, bf16=True))
    stats = [trainer.train_step() for _ in range(3)]
    assert all(math.isfinite(s["loss"]) for s in stats)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_resume_continues_exactly(tmp_path):
    # uninterrupted: 6 steps (dropout on, so the RNG state must round-trip too)
    straight = _new_trainer()
    expected = [straight.train_step()["loss"] for _ in range(6)]

    first = _new_trainer()
    log = fit(first, 3, progress=False)
    write_checkpoint(first, str(tmp_path), log)
    assert checkpoint_steps(str(tmp_path)) == [3]
    torch.manual_seed(12345)  # a fresh process would start from another RNG state
    model = load_model(model_path(str(tmp_path), 3))
    state = load_state(state_path(str(tmp_path), 3))
    resumed = Trainer(model, PAIRS, TrainOptions(**state["options"]))
    resumed.load_state_dict(state)
    log = fit(resumed, 6, log=state["log"], progress=False)
    assert [e["loss"] for e in log["train"]] == expected
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_average_checkpoints(tmp_path):
    trainer = _new_trainer()
    params = []
    for _ in range(3):
        trainer.train_step()
        write_checkpoint(trainer, str(tmp_path), {"train": [], "valid": []}, keep_last=2)
        params.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert checkpoint_steps(str(tmp_path)) == [2, 3]  # keep_last pruned step 1
    out, steps = average_checkpoints(str(tmp_path), last=5)
    assert steps == [2, 3]
    averaged = load_model(out).state_dict()
    for k, v in averaged.items():
        torch.testing.assert_close(v, (params[1][k] + params[2][k]) / 2)
    # another config in the same directory is refused
    torch.manual_seed(0)
    Transformer(small_config(d_ff=48)).save(model_path(str(tmp_path), 4))
    with pytest.raises(UserInputError, match="another config.*d_ff=48"):
        average_checkpoints(str(tmp_path), last=3)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    trainer = _new_trainer()
    trainer.train_step()
    write_checkpoint(trainer, str(tmp_path), {"train": [], "valid": []})
    for path, loader in ((model_path(str(tmp_path), 1), load_model), (state_path(str(tmp_path), 1), load_state)):
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        with pytest.raises(UserInputError, match="truncated or corrupt"):
            loader(path)
    with pytest.raises(UserInputError, match="does not exist"):
        load_model(str(tmp_path / "nope.safetensors"))


# -- data parallel (DDP, gloo) -------------------------------------------------------------------

DDP_STEPS = 3
DDP_OPTIONS = TrainOptions(max_tokens=800, micro_tokens=120, warmup=3, seed=7)


def _ddp_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    from aiayn.train.distributed import current_context

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        trainer = Trainer(Transformer(small_config(dropout=0.0)), PAIRS, DDP_OPTIONS, ctx=current_context())
        losses = [trainer.train_step()["loss"] for _ in range(DDP_STEPS)]
        torch.save({"params": trainer.model.state_dict(), "losses": losses},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # one process, the whole batch in one piece (no accumulation)
    torch.manual_seed(0)
    single = Trainer(Transformer(small_config(dropout=0.0)), PAIRS,
                     TrainOptions(max_tokens=DDP_OPTIONS.max_tokens, warmup=3, seed=7))
    losses = [single.train_step()["loss"] for _ in range(DDP_STEPS)]
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5)
    for k, v in single.model.state_dict().items():
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k])  # ranks stay in lock-step
        ddp = ranks[0]["params"][k]
        if k.endswith("in_proj_bias"):
            # the key bias shifts every score of a softmax row equally: its true gradient is 0, so
            # Adam's update m / sqrt(v) is the sign of rounding noise there; compare q and v only
            d = v.numel() // 3
            v, ddp = torch.cat([v[:d], v[2 * d:]]), torch.cat([ddp[:d], ddp[2 * d:]])
        torch.testing.assert_close(ddp, v, rtol=1e-4, atol=2e-5, msg=k)


# -- the loss fused with the projection (aiayn.functional.linear_cross_entropy) -------------------

@pytest.mark.parametrize("share_embeddings", [True, False])
def test_fused_loss_step_matches_unfused(share_embeddings):
    """A training step with the fused loss (decoder states + projection matrix, the default) and
    one with full logits + label_smoothed_cross_entropy: same losses and gradients up to rounding
    (dropout on: both draw the same masks from the same RNG state)."""
    from aiayn.train.loss import fused_label_smoothed_cross_entropy

    grads, stats = [], []
    for fused in (True, False):
        torch.manual_seed(3)
        model = Transformer(small_config(share_embeddings=share_embeddings))
        trainer = Trainer(model, PAIRS, TrainOptions(max_tokens=600, micro_tokens=250, warmup=5, seed=3),
                          fused_loss=fused)
        valid = trainer.evaluate(PAIRS[:50])
        stats.append(dict(trainer.train_step(), valid=valid))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})  # the step's, kept by step()
    for key in ("loss", "nll"):
        assert stats[0][key] == pytest.approx(stats[1][key], rel=1e-5)
    assert stats[0]["valid"] == pytest.approx(stats[1]["valid"], rel=1e-5)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    # the function on its own: sums over non-padding positions, as the unfused loss
    hidden = torch.randn(3, 7, 32)
    weight = torch.randn(13, 32) / 32 ** 0.5
    target = torch.randint(1, 13, (3, 7))
    target[0, 4:] = 0
    fused = fused_label_smoothed_cross_entropy(hidden, weight, target, 0.1, 0)
    unfused = label_smoothed_cross_entropy(hidden @ weight.t(), target, 0.1, 0)
    torch.testing.assert_close(fused, unfused)
    with pytest.raises(ValueError, match="do not match"):
        fused_label_smoothed_cross_entropy(hidden, weight, target[:, :5], 0.1, 0)


def test_fused_loss_bf16_step_close_to_unfused():
    """Under bf16 autocast the fused loss does not round the logits to bf16 (the unfused path
    does): losses agree to bf16 precision."""
    losses = []
    for fused in (True, False):
        torch.manual_seed(4)
        trainer = Trainer(Transformer(small_config()), PAIRS, TrainOptions(max_tokens=600, warmup=5, bf16=True),
                          fused_loss=fused)
        losses.append([trainer.train_step()["loss"] for _ in range(2)])
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_make_optimizer_is_fused_adam_where_available():
    """make_optimizer takes torch's fused Adam (foreach where fused is unavailable): same update
    as the per-tensor loop up to rounding."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = make_optimizer(params)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    loop = torch.optim.Adam(twins, lr=1.0, betas=(0.9, 0.98), eps=1e-9, foreach=False)
    for _ in range(3):
        for a, b in zip(params, twins):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        for o in (opt, loop):
            for g in o.param_groups:
                g["lr"] = 1e-3
            o.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b)


def test_optimizer_step_is_seen_by_the_packed_weight_cache():
    """Every optimizer step bumps the parameters' versions (torch's fused Adam on the CPU does not
    by itself), so linear / feed_forward under the packed-weight cache (on while decoding, e.g. the
    dev BLEU of a run) use the new weights: the same output as without the cache."""
    import aiayn
    from aiayn.train.schedule import make_optimizer

    lin = torch.nn.Linear(48, 40)
    opt = make_optimizer(lin.parameters())
    for g in opt.param_groups:
        g["lr"] = 1e-2
    x = torch.randn(7, 48)
    for _ in range(3):
        before = lin.weight._version
        with torch.no_grad(), aiayn.packed_weight_cache():
            cached = aiayn.functional.linear(x, lin.weight, lin.bias)
        assert torch.equal(cached, aiayn.functional.linear(x, lin.weight, lin.bias).detach())
        lin.weight.grad, lin.bias.grad = torch.randn_like(lin.weight), torch.randn_like(lin.bias)
        opt.step()
        assert lin.weight._version > before
