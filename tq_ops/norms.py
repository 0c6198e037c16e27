"""Exponent-safe vector norms: the one definition of ||x|| that every path stores."""

import torch
from torch import Tensor


def unit_and_norm(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., D) -> (x / ||x|| (..., D), 0 where x = 0; ||x|| (..., 1)), float32 (float64
    for float64 x).

    Exponent-safe: x is divided by max|x| before squaring, so neither tiny (subnormal) nor
    huge coordinates underflow or overflow; ||x|| is inf only when it exceeds the range of
    its dtype, NaN when x holds inf or NaN.
    """
    xf = x if x.dtype == torch.float64 else x.float()
    peak = xf.abs().amax(-1, keepdim=True)
    scaled = xf / torch.where(peak > 0, peak, 1.0)  # coordinates in [-1, 1]
    length = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)  # in [1, sqrt(D)] or 0
    return torch.where(length > 0, scaled / length, 0.0), peak * length


def vector_norms(x: Tensor) -> Tensor:
    """||x|| of each vector of x (..., D): (..., 1), exponent-safe (`unit_and_norm`), float32
    (float64 for float64 input, whose range float32 does not cover)."""
    return unit_and_norm(x)[1]
