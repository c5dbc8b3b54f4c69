"""aiayn.functional.log_softmax_topk (beam search's step scoring) against the float64 reference:
every ISA, float32 and bfloat16 logits, vocabularies that are not a multiple of any vector width,
excluded columns, ties, rows with few finite values, large logits, strided and 3-d inputs."""

import pytest
import torch

import aiayn
import aiayn.functional as AF
from aiayn import reference

from conftest import assert_2x_rule

NINF = float("-inf")


def sum_slack(V):
    """The normaliser is a float32 sum of V exponentials in P partial sums (P lanes of the ISA's
    vector; 4 scalar sums on the generic ISA): its relative rounding error, and so the log-sum-exp's
    absolute one, grows like sqrt(V / P) ulps. torch's log_softmax sums in more partials (a
    generic-ISA row of 37000 missed the plain 2x rule by 4%: 1.57e-5 against 1.51e-5)."""
    lanes = {"generic": 4, "avx2": 8, "avx512": 16}.get(aiayn._C.cpu_isa(), 4)
    return 4 * 2.0**-24 * (V / lanes) ** 0.5


def check(logits, k, exclude, seed, what):
    ours_v, ours_i = AF.log_softmax_topk(logits, k, exclude)
    assert ours_v.dtype == torch.float32 and ours_i.dtype == torch.int64
    assert ours_v.shape == ours_i.shape == (*logits.shape[:-1], k)
    x = logits.float().reshape(-1, logits.shape[-1])
    v, i = ours_v.reshape(-1, k), ours_i.reshape(-1, k)
    exact = torch.log_softmax(x.double(), -1)  # the float64 truth of every column
    torch_lp = torch.log_softmax(x, -1)  # torch's own float32 log-probabilities
    allowed = torch.ones_like(x, dtype=torch.bool)
    allowed[:, list(exclude)] = False
    for r in range(x.shape[0]):
        candidates = x[r][allowed[r] & (x[r] > NINF)]
        n = min(k, candidates.numel())
        # The chosen columns: distinct, never excluded, their logits the n largest (descending,
        # equal logits lower index first); then -inf slots with index -1.
        chosen = i[r, :n]
        assert len(set(chosen.tolist())) == n and bool(allowed[r, chosen].all()), f"{what}: row {r} {chosen}"
        assert torch.equal(x[r, chosen], candidates.sort(descending=True).values[:n]), f"{what}: row {r}"
        for a, b in zip(chosen[:-1].tolist(), chosen[1:].tolist()):
            assert x[r, a] > x[r, b] or a < b, f"{what}: row {r}: equal logits out of index order"
        assert bool((v[r, n:] == NINF).all()) and bool((i[r, n:] == -1).all()), f"{what}: row {r} tail"
        if n:
            assert_2x_rule(v[r, :n], torch_lp[r, chosen], exact[r, chosen], f"{what}: row {r} values",
                           slack=2e-6 * (1 + exact[r, chosen].abs().max().item()) + sum_slack(x.shape[-1]),
                           seed=seed)
    # The reference's values (torch's log_softmax + topk) to float32 rounding of a long sum (the
    # generic ISA adds 8000 exponentials in 4 scalar partial sums).
    ref_v, _ = reference.log_softmax_topk(logits, k, exclude)
    torch.testing.assert_close(ours_v, ref_v, rtol=2e-5, atol=2e-5, equal_nan=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,V,k", [(1, 1, 1), (3, 7, 4), (5, 63, 8), (2, 64, 64), (4, 65, 5), (33, 1000, 8),
                                      (6, 8003, 8), (2, 37000, 10)])
def test_matches_reference(isa, rng_seed, dtype, rows, V, k):
    logits = (torch.randn(rows, V) * 4).to(dtype)
    exclude = [0, 1] if V > 2 * k + 2 else []
    check(logits, k, exclude, rng_seed, f"{isa} {dtype} {rows}x{V} k={k}")


def test_ties_bf16_and_repeated_values(isa, rng_seed):
    """bf16 logits from few distinct values: many exact ties, resolved lower index first."""
    logits = torch.randint(-3, 4, (9, 301)).to(torch.bfloat16) / 2
    check(logits, 8, [2], rng_seed, f"{isa} ties")


def test_rows_with_few_finite_values_and_large_logits(isa, rng_seed):
    logits = torch.randn(6, 100) * 3
    logits[0] = NINF
    logits[0, 17] = 5.0  # one finite value: one slot, then -inf / -1
    logits[1, :97] = NINF  # three finite values, one of them excluded
    logits[2] = NINF  # nothing finite: all slots -inf / -1
    logits[3] *= 1e4  # no overflow in exp
    logits[4] -= 1e6
    check(logits, 4, [98], rng_seed, f"{isa} sparse rows")
    v, i = AF.log_softmax_topk(logits, 4, [98])
    assert i[0].tolist() == [17, -1, -1, -1] and v[0, 0].item() == 0.0
    assert i[2].tolist() == [-1] * 4


def test_strided_and_batched_inputs(isa, rng_seed):
    base = torch.randn(4, 3, 250)
    check(base[:, :, :200], 6, [0], rng_seed, f"{isa} row stride > V")
    check(base.transpose(0, 1), 6, [], rng_seed, f"{isa} transposed leading dims")
    check(torch.randn(200, 5).t(), 3, [], rng_seed, f"{isa} strided last dim")


def test_excluded_columns_still_normalise(rng_seed):
    """Excluding a column removes it from the choice, not from the softmax's sum."""
    logits = torch.randn(3, 50)
    logits[:, 7] = 10.0
    v, i = AF.log_softmax_topk(logits, 3, [7])
    assert 7 not in i.tolist()[0]
    expected = torch.log_softmax(logits.double(), -1).gather(1, i)
    torch.testing.assert_close(v.double(), expected, rtol=0, atol=1e-5)


def test_float64_and_other_devices_use_the_reference(rng_seed):
    logits = torch.randn(4, 30, dtype=torch.float64)
    v, i = AF.log_softmax_topk(logits, 5, [0])
    rv, ri = reference.log_softmax_topk(logits, 5, [0])
    assert torch.equal(v, rv) and torch.equal(i, ri)


def test_opcheck():
    torch.library.opcheck(torch.ops.aiayn.log_softmax_topk.default, (torch.randn(5, 37), 4, [0, 1]))
    torch.library.opcheck(torch.ops.aiayn.log_softmax_topk.default, (torch.randn(2, 3, 70).bfloat16(), 8, []))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 5), 0, []), "'k'"),
    ((torch.randn(2, 5), 6, []), "'k'"),
    ((torch.randn(2, 100), 65, []), "'k'"),
    ((torch.randn(2, 5), 2, [5]), "'exclude'"),
    ((torch.randn(2, 5), 2, [-1]), "'exclude'"),
    ((torch.randn(2, 0), 1, []), "'logits'"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        AF.log_softmax_topk(*args)
    with pytest.raises(TypeError, match="'logits'"):
        AF.log_softmax_topk(torch.randint(0, 3, (2, 5)).tolist(), 1)
    with pytest.raises(TypeError, match="'logits'"):
        torch.ops.aiayn.log_softmax_topk(torch.randint(0, 3, (2, 5)), 1, [])
