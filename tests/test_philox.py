"""Philox4x32-10 and the counter layout of the noise stream, bit for bit."""
import pytest
import torch

import diffkern as dk
from diffkern import ops, reference

# Random123 kat_vectors, philox4x32 10 rounds: counter[4], key[2] -> output[4].
KAT = [
    ([0x00000000] * 4, [0x00000000] * 2, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


def kat_tensors(device="cpu"):
    counter = torch.tensor([k[0] for k in KAT], dtype=torch.int64, device=device)
    key = torch.tensor([k[1] for k in KAT], dtype=torch.int64, device=device)
    expected = torch.tensor([k[2] for k in KAT], dtype=torch.int64, device=device)
    return counter, key, expected


def test_known_answers_kernel(device):
    counter, key, expected = kat_tensors(device)
    assert torch.equal(ops.philox4x32_10(counter, key), expected)


def test_known_answers_reference():
    counter, key, expected = kat_tensors()
    assert torch.equal(reference.philox4x32_10(counter, key), expected)


def test_kernel_matches_reference_on_random_counters(device):
    gen = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (4096, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 2**32, (4096, 2), generator=gen, dtype=torch.int64)
    got = ops.philox4x32_10(counter.to(device), key.to(device)).cpu()
    assert torch.equal(got, reference.philox4x32_10(counter, key))


def test_negative_int64_means_low_32_bits():
    counter = torch.full((1, 4), -1, dtype=torch.int64)
    key = torch.full((1, 2), -1, dtype=torch.int64)
    assert torch.equal(ops.philox4x32_10(counter, key)[0], torch.tensor(KAT[1][2]))


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1), (2, 5), (4, 3, 3), (3, 8), (0, 4), (2, 0), ()])
@pytest.mark.parametrize("seed,step,offset,stream", [
    (0, 0, 0, 0), (123, 7, 5, 1), (2**64 - 1, 2**32 - 1, 2**32 - 16, 2**32 - 1), (2**63, 1, 0, 9)])
def test_random_bits_match_reference(device, shape, seed, step, offset, stream):
    got = dk.random_bits(shape, seed=seed, step=step, sample_offset=offset, stream=stream, device=device)
    expected = reference.random_bits(shape, seed, step, offset, stream)
    assert got.dtype == torch.int32 and got.shape == torch.Size(shape)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("shape", [(4096, 2), (100, 37), (33, 4), (17, 3), (5, 1000)])
def test_random_bits_match_reference_past_a_vector(shape):
    """Shapes with more blocks than a SIMD vector holds: the SIMD fill moves the words as float bit
    patterns, and every pattern (signalling NaNs included) must come out unchanged."""
    got = dk.random_bits(shape, seed=77, step=3, sample_offset=9, stream=3)
    assert torch.equal(got, reference.random_bits(shape, 77, 3, 9, 3))


def test_counter_layout_is_the_contract():
    """Element (n, j) is word j % 4 of Philox((j // 4, offset + n, step, stream), seed)."""
    seed, step, offset, stream = 0xDEADBEEF12345678, 3, 40, 2
    bits = dk.random_bits((3, 2, 5), seed=seed, step=step, sample_offset=offset, stream=stream).reshape(3, 10)
    for n in range(3):
        for j in range(10):
            counter = torch.tensor([[j // 4, offset + n, step, stream]])
            key = torch.tensor([[seed & 0xFFFFFFFF, seed >> 32]])
            word = int(reference.philox4x32_10(counter, key)[0, j % 4])
            assert int(bits[n, j]) & 0xFFFFFFFF == word


@pytest.mark.parametrize("counter_shape,key_shape,message", [
    ((3, 3), (3, 2), r"\[\.\.\., 4\]"),
    ((3, 4), (3, 3), r"\[\.\.\., 2\]"),
    ((3, 4), (2, 2), "same number of rows"),
])
def test_philox_bad_shapes(counter_shape, key_shape, message):
    with pytest.raises(ValueError, match=message):
        ops.philox4x32_10(torch.zeros(counter_shape, dtype=torch.int64), torch.zeros(key_shape, dtype=torch.int64))


def test_philox_bad_dtype():
    with pytest.raises(ValueError, match="int64"):
        ops.philox4x32_10(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int64))


def test_opcheck_philox():
    counter, key, _ = kat_tensors()
    torch.library.opcheck(torch.ops.diffkern.philox4x32_10.default, (counter, key))


def test_opcheck_random_bits():
    torch.library.opcheck(torch.ops.diffkern.random_bits.default,
                          ([3, 5], 1, 2, 3, 4, None, torch.device("cpu")))
    seed_step = torch.tensor([5, 6])
    torch.library.opcheck(torch.ops.diffkern.random_bits.default,
                          ([3, 5], 0, 0, 0, 0, seed_step, torch.device("cpu")))
