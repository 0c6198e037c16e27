"""The paper's distortion table, measured on fresh random data (d = 128, 20,000 samples)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tq_ops import TurboQuantMSE, TurboQuantProd

DIM, N = 128, 20_000
D_MSE = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}      # issue table (exact Beta values)
D_PROD_TIMES_D = {1: 1.571, 2: 0.567, 3: 0.182, 4: 0.053}


def unit(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(1, 1, n, DIM, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def prod_estimates(bits: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Estimate <q_i, k_i> for each pair i with TurboQuantProd, without the N x N matrix."""
    quant = TurboQuantProd(DIM, bits, seed=bits)
    fields = quant.quantize(k)
    k_hat = quant.dequantize(*fields, dtype=torch.float32).double()  # linear: <q, k_hat> is the estimate
    full = quant.scores(q[:, :, :64], *(f[:, :, :64] for f in fields)).double()
    assert torch.allclose(full.diagonal(dim1=-2, dim2=-1),
                          (q[:, :, :64].double() * k_hat[:, :, :64]).sum(-1), atol=1e-5)
    return (q.double() * k_hat).sum(-1).flatten()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion(bits):
    x = unit(N, 100 + bits)
    quant = TurboQuantMSE(DIM, bits, seed=bits)
    x_hat = quant.dequantize(*quant.quantize(x), dtype=torch.float32).double()
    measured = (x.double() - x_hat).pow(2).sum(-1).mean().item()
    print(f"D_mse bits={bits}: {measured:.5f} (paper {D_MSE[bits]})")
    assert measured == pytest.approx(D_MSE[bits], rel=0.03)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_distortion_is_the_papers(bits):
    q, k = unit(N, 200 + bits), unit(N, 300 + bits)
    err = prod_estimates(bits, q, k) - (q.double() * k.double()).sum(-1).flatten()
    measured = err.pow(2).mean().item() * DIM
    print(f"D_prod*d bits={bits}: {measured:.4f} (paper {D_PROD_TIMES_D[bits]})")
    assert measured == pytest.approx(D_PROD_TIMES_D[bits], rel=0.10)
    standard_error = err.std().item() / math.sqrt(N)
    assert abs(err.mean().item()) < 3 * standard_error


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_estimator_has_unit_slope(bits):
    """Regress the estimate on the true <q, k> over pairs whose cosine spans [-1, 1]."""
    k = unit(N, 400 + bits)
    gen = torch.Generator().manual_seed(500 + bits)
    noise = torch.randn(k.shape, generator=gen)
    noise -= (noise * k).sum(-1, keepdim=True) * k
    noise /= noise.norm(dim=-1, keepdim=True)
    cos = torch.rand(1, 1, N, 1, generator=gen) * 2 - 1
    q = cos * k + (1 - cos**2).sqrt() * noise
    true = cos.double().flatten()
    est = prod_estimates(bits, q, k)
    slope = ((est - est.mean()) * (true - true.mean())).sum() / (true - true.mean()).pow(2).sum()
    print(f"slope bits={bits}: {slope.item():.4f}")
    assert slope.item() == pytest.approx(1.0, abs=0.03)
    err = est - true
    assert abs(err.mean().item()) < 3 * err.std().item() / math.sqrt(N)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_inner_product_is_shrunk_by_one_minus_distortion(bits):
    """E<y, x_hat> = (1 - D_b) <y, x> (research note 2.6): the bias Prod removes."""
    x = unit(N, 600 + bits)
    quant = TurboQuantMSE(DIM, bits, seed=bits)
    x_hat = quant.dequantize(*quant.quantize(x), dtype=torch.float32).double()
    shrink = (x.double() * x_hat).sum(-1).mean().item()
    assert shrink == pytest.approx(1 - D_MSE[bits], abs=0.005)


@settings(max_examples=8, deadline=None)
@given(bits=st.integers(1, 4), cos=st.floats(-0.95, 0.95), dim=st.sampled_from([32, 64, 96]),
       seed=st.integers(0, 10_000))
def test_prod_is_unbiased_over_fresh_matrices(bits, cos, dim, seed):
    """For any fixed pair (q, k), the mean estimate over fresh (Pi, S) is <q, k>."""
    gen = torch.Generator().manual_seed(seed)
    k, noise = torch.randn(2, 1, 1, 1, dim, generator=gen)
    k, noise = k / k.norm(), noise - (noise * k).sum() * k / k.norm() ** 2
    q = cos * k + math.sqrt(1 - cos**2) * noise / noise.norm()
    estimates = []
    for draw in range(120):
        quant = TurboQuantProd(dim, bits, seed=seed * 1000 + draw, norm_dtype=torch.float32)
        estimates.append(quant.scores(q, *quant.quantize(k)).item())
    err = torch.tensor(estimates, dtype=torch.float64) - (q * k).sum().item()
    assert abs(err.mean().item()) < 4 * err.std().item() / math.sqrt(len(err)) + 1e-6
