import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tq_ops.codebook import lloyd_max, mse_distortion

# Exact-Beta values for d = 128 from shared/research/turboquant_math.md section 2.4(b), and
# the d = 64 / 256 rows of the same section.
EXACT = {128: [0.36089, 0.11600, 0.03397, 0.00931], 64: [0.35839, 0.11453, 0.03339, 0.00913],
         256: [0.36214, 0.11674, 0.03426, 0.00941]}
# Max's N(0, 1) Lloyd-Max distortions: the d -> infinity limit.
GAUSSIAN_LIMIT = [0.36338, 0.11748, 0.03455, 0.00950]


@pytest.mark.parametrize("dim", sorted(EXACT))
def test_exact_distortion_matches_independent_solve(dim):
    for bits, expected in enumerate(EXACT[dim], start=1):
        assert mse_distortion(dim, bits) == pytest.approx(expected, abs=6e-6)


def test_large_dim_tends_to_gaussian_limit():
    got = [mse_distortion(4096, b) for b in range(1, 5)]
    assert got == pytest.approx(GAUSSIAN_LIMIT, rel=2e-3)


def test_d128_centroids_match_published_values():
    # positive centroids x sqrt(128), same source as EXACT
    c = lloyd_max(128, 4) * math.sqrt(128)
    expected = [0.1279, 0.3864, 0.6536, 0.9371, 1.2478, 1.6043, 2.0459, 2.6889]
    assert c[8:].tolist() == pytest.approx(expected, abs=1e-4)


@settings(max_examples=12, deadline=None)
@given(dim=st.integers(16, 512), bits=st.integers(1, 8))
def test_codebook_is_a_fixed_point_of_lloyd(dim, bits):
    """Each centroid is the conditional mean of its cell, checked by direct quadrature."""
    c = lloyd_max(dim, bits)
    assert c.dtype == torch.float64 and c.shape == (1 << bits,)
    assert (c.diff() > 0).all() and torch.allclose(c, -c.flip(0))
    x = torch.linspace(-1, 1, 2_000_001, dtype=torch.float64)
    pdf = (1 - x * x).clamp_min(0) ** ((dim - 3) / 2)
    cell = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
    mass = torch.zeros(1 << bits, dtype=torch.float64).index_add_(0, cell, pdf)
    moment = torch.zeros(1 << bits, dtype=torch.float64).index_add_(0, cell, pdf * x)
    populated = mass > mass.sum() * 1e-9
    sigma = 1 / math.sqrt(dim)
    assert torch.allclose((moment / mass)[populated], c[populated], atol=2e-5 * sigma)


def test_distortion_decreases_by_about_4x_per_bit():
    d = [mse_distortion(128, b) for b in range(1, 9)]
    ratios = [a / b for a, b in zip(d, d[1:])]
    assert all(3.0 < r < 4.1 for r in ratios)
    # paper bounds: 4^-b <= D <= (sqrt(3) pi / 2) 4^-b
    assert all(4.0**-b <= v <= math.sqrt(3) * math.pi / 2 * 4.0**-b for b, v in enumerate(d, 1))


@pytest.mark.parametrize("dim,bits", [(7, 2), (4097, 2), (128, 0), (128, 9), (128.0, 2)])
def test_bad_arguments(dim, bits):
    with pytest.raises(ValueError, match="dim|bits"):
        lloyd_max(dim, bits)
