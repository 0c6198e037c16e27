import pytest
import torch
from hypothesis import given, settings, strategies as st

from tq_ops.packing import pack, packed_bytes, plane_widths, unpack


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(0, 8), dim=st.integers(1, 300), rows=st.integers(0, 4),
       seed=st.integers(0, 2**31))
def test_round_trip(bits, dim, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, 3, dim), generator=gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, 3, packed_bytes(dim, bits))
    assert torch.equal(unpack(packed, bits, dim), codes.int())


@pytest.mark.parametrize("bits", range(1, 9))
def test_size_is_exactly_bits_per_coordinate(bits):
    for dim in (64, 80, 96, 128, 256):
        assert packed_bytes(dim, bits) == dim * bits // 8
    assert sum(plane_widths(bits)) == bits


def test_four_bit_layout_pairs_coordinate_k_with_k_plus_half():
    codes = torch.randint(0, 16, (128,))
    packed = pack(codes, 4)
    assert torch.equal(packed.int(), codes[:64].int() | (codes[64:].int() << 4))


def test_three_bit_layout_is_two_bit_plane_then_one_bit_plane():
    codes = torch.randint(0, 8, (128,))
    packed = pack(codes, 3).int()
    high, low = (codes >> 1).int(), (codes & 1).int()
    expect_high = sum(high[i * 32:(i + 1) * 32] << (2 * i) for i in range(4))
    expect_low = sum(low[i * 16:(i + 1) * 16] << i for i in range(8))
    assert torch.equal(packed[:32], expect_high) and torch.equal(packed[32:], expect_low)
