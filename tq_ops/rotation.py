"""Seeded random matrices: the Haar rotation Pi and the Gaussian QJL projection S.

Both are drawn in float64 on the CPU from a private generator, so the same seed gives the
same matrix on every machine and device; callers move the float32 result where needed.
"""

import torch

_QJL_STREAM = 0x51_4A_4C  # offsets the QJL seed so S is independent of Pi for the same seed
# Seeds whose Pi stream (seed) and S stream (seed + _QJL_STREAM) both fit what
# torch.Generator.manual_seed takes, [-2**63, 2**64 - 1].
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1 - _QJL_STREAM)


def check_seed(seed) -> None:
    """Refuse a seed that is not an int (TypeError; bool too) or is outside SEED_RANGE
    (ValueError), naming `seed`."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"seed must be in [-2**63, 2**64 - 1 - {_QJL_STREAM}] (the QJL stream "
                         f"seed + {_QJL_STREAM} must fit torch.Generator.manual_seed), got {seed}")


def haar_rotation(dim: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal Pi (dim, dim) float32, contiguous (kernels read it in place): QR
    of a Gaussian with the sign fix."""
    check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(dim, dim, dtype=torch.float64, generator=gen)
    q, r = torch.linalg.qr(gauss)
    return (q * torch.sign(torch.diagonal(r))).float().contiguous()


def qjl_matrix(rows: int, dim: int, seed: int) -> torch.Tensor:
    """QJL projection S (rows, dim) float32 with i.i.d. N(0, 1) entries (not rescaled)."""
    check_seed(seed)
    gen = torch.Generator().manual_seed(seed + _QJL_STREAM)
    return torch.randn(rows, dim, dtype=torch.float64, generator=gen).float()
