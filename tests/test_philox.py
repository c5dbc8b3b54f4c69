"""The Philox4x32-10 RNG shared by every dropout: C++ (csrc/common/philox.h), the vectorised
keep-bit kernels of each ISA, and the Python reference must all agree with Random123's answers."""

import pytest
import torch

import aiayn
from aiayn import reference

# Known-answer vectors of Random123 (kat_vectors: philox4x32 10 rounds): counter, key, output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_cpp_philox_known_answers(ctr, key, expected):
    assert tuple(aiayn._C.philox4x32_10(list(ctr), list(key))) == expected


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_reference_philox_known_answers(ctr, key, expected):
    out = reference.philox4x32_10(torch.tensor([ctr], dtype=torch.int64), torch.tensor([key], dtype=torch.int64))
    assert tuple(out[0].tolist()) == expected


def test_reference_matches_cpp_on_random_counters():
    g = torch.Generator().manual_seed(1234)
    ctr = torch.randint(0, 2**32, (64, 4), generator=g, dtype=torch.int64)
    key = torch.randint(0, 2**32, (64, 2), generator=g, dtype=torch.int64)
    out = reference.philox4x32_10(ctr, key)
    for i in range(64):
        assert tuple(out[i].tolist()) == tuple(aiayn._C.philox4x32_10(ctr[i].tolist(), key[i].tolist()))


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 13), (64,), (65,), (1000, 37), (2, 3, 4099)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_matches_reference(isa, shape, p):
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    ours = aiayn.functional.dropout_mask(torch.empty(shape), p, seed)
    assert ours.dtype == torch.bool and ours.shape == torch.Size(shape)
    assert torch.equal(ours, reference.dropout_mask(shape, p, seed))


def test_dropout_mask_seed_high_bits_and_counter_carry(isa):
    # Seeds use all 64 bits of the key; masks longer than 2^32 / 4 counters are out of reach here,
    # but counters crossing a lane block boundary at odd offsets are covered by odd shapes above.
    seed = torch.tensor([(0xDEADBEEF << 30) | 12345], dtype=torch.int64)
    ours = aiayn.functional.dropout_mask(torch.empty(4097), 0.3, seed)
    assert torch.equal(ours, reference.dropout_mask((4097,), 0.3, seed))


def test_dropout_mask_edges():
    seed = torch.tensor([7], dtype=torch.int64)
    x = torch.empty(1000)
    assert aiayn.functional.dropout_mask(x, 0.0, seed).all()
    assert not aiayn.functional.dropout_mask(x, 1.0, seed).any()
    assert aiayn.functional.dropout_mask(torch.empty(0, 3), 0.5, seed).shape == (0, 3)
    kept = aiayn.functional.dropout_mask(torch.empty(200_000), 0.25, seed).float().mean().item()
    assert abs(kept - 0.75) < 0.01


def test_dropout_mask_bad_args():
    with pytest.raises(ValueError, match="'p'"):
        aiayn.functional.dropout_mask(torch.empty(3), 1.5, torch.tensor([1]))
    with pytest.raises((TypeError, RuntimeError), match="'seed'"):
        aiayn.functional.dropout_mask(torch.empty(3), 0.5, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="'seed'"):
        aiayn.functional.dropout_mask(torch.empty(3), 0.5, torch.tensor([1, 2]))
