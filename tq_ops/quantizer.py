"""TurboQuant quantizers: the constant tensors of one (dim, bits, seed) and calls into `tq::` ops.

`TurboQuantMSE` stores norm + b-bit codes of the rotated unit vector (paper Alg. 1).
`TurboQuantProd` stores (b-1)-bit MSE codes + 1-bit QJL signs of the residual + the residual
norm (paper Alg. 2); its inner-product estimate is unbiased.
All tensors are (..., dim) with the (B, H, S) leading dims the ops expect.
"""

import torch
from torch import Tensor, nn

from . import checks, ops  # noqa: F401  (ops registers torch.ops.tq)
from .codebook import lloyd_max
from .rotation import haar_rotation, qjl_matrix


def _check_bits(bits: int, low: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= 8:
        raise ValueError(f"bits must be an int in [{low}, 8], got {bits!r}")


def _check_norm_dtype(norm_dtype: torch.dtype) -> None:
    if norm_dtype not in checks.NORM_DTYPES:
        raise TypeError(f"norm_dtype must be float16, bfloat16 or float32, got {norm_dtype}")


class TurboQuantMSE(nn.Module):
    """MSE-optimal TurboQuant: `bits` bits per coordinate plus one norm per vector.

    Buffers: rotation (dim, dim) float32, centroids (2**bits,) float32.
    """

    def __init__(self, dim: int, bits: int, seed: int = 42,
                 norm_dtype: torch.dtype = torch.float16):
        super().__init__()
        checks.head_dim("dim", dim)
        _check_bits(bits, 1)
        _check_norm_dtype(norm_dtype)
        self.dim, self.bits, self.index_bits, self.norm_dtype = dim, bits, bits, norm_dtype
        self.register_buffer("centroids", lloyd_max(dim, bits).float(), persistent=False)
        self.register_buffer("rotation", haar_rotation(dim, seed), persistent=False)
        self.qjl = None

    def _consts(self, like: Tensor) -> "TurboQuantMSE":
        return self if self.rotation.device == like.device else self.to(like.device)

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, H, S, dim) -> (indices uint8 (B, H, S, bits*dim/8), norms (B, H, S, 1))."""
        checks.tensor("x", x, ndim=4, dtypes=checks.FLOAT_DTYPES)
        q = self._consts(x)
        indices, norms, _, _ = torch.ops.tq.compress(x, q.rotation, q.centroids, None,
                                                     self.index_bits, self.norm_dtype)
        checks.finite_norms(norms, self.norm_dtype)
        return indices, norms

    def dequantize(self, indices: Tensor, norms: Tensor,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Packed fields -> (B, H, S, dim) in `dtype`."""
        q = self._consts(indices)
        return torch.ops.tq.decompress(indices, norms, None, None, q.rotation, q.centroids, None,
                                       self.index_bits, dtype)

    def scores(self, query: Tensor, indices: Tensor, norms: Tensor) -> Tensor:
        """Unscaled <query, x_hat> logits (B, Hq, Lq, S) in the query dtype (biased by 1 - D_b)."""
        q = self._consts(indices)
        return torch.ops.tq.scores(query, indices, norms, None, None, q.rotation, q.centroids,
                                   None, self.index_bits)


class TurboQuantProd(nn.Module):
    """Inner-product TurboQuant: (bits-1)-bit MSE codes + 1-bit QJL of the residual.

    bits = 1 stores QJL signs only. Buffers: rotation (dim, dim), centroids (2**(bits-1),),
    qjl (qjl_dim, dim) with i.i.d. N(0, 1) entries, all float32.
    """

    def __init__(self, dim: int, bits: int, seed: int = 42, qjl_dim: int | None = None,
                 norm_dtype: torch.dtype = torch.float16):
        super().__init__()
        checks.head_dim("dim", dim)
        _check_bits(bits, 1)
        _check_norm_dtype(norm_dtype)
        qjl_dim = dim if qjl_dim is None else qjl_dim
        if not isinstance(qjl_dim, int) or isinstance(qjl_dim, bool) or qjl_dim < 1:
            raise ValueError(f"qjl_dim must be a positive int, got {qjl_dim!r}")
        self.dim, self.bits, self.index_bits, self.norm_dtype = dim, bits, bits - 1, norm_dtype
        self.qjl_dim = qjl_dim
        centroids = lloyd_max(dim, bits - 1).float() if bits > 1 else torch.zeros(1)
        self.register_buffer("centroids", centroids, persistent=False)
        self.register_buffer("rotation", haar_rotation(dim, seed), persistent=False)
        self.register_buffer("qjl", qjl_matrix(qjl_dim, dim, seed), persistent=False)

    _consts = TurboQuantMSE._consts

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, H, S, dim) -> (indices, norms, signs uint8 (B, H, S, qjl_dim/8), residual_norms)."""
        checks.tensor("x", x, ndim=4, dtypes=checks.FLOAT_DTYPES)
        q = self._consts(x)
        out = torch.ops.tq.compress(x, q.rotation, q.centroids, q.qjl, self.index_bits,
                                    self.norm_dtype)
        checks.finite_norms(out[1], self.norm_dtype)
        return out

    def dequantize(self, indices: Tensor, norms: Tensor, signs: Tensor, residual_norms: Tensor,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Packed fields -> (B, H, S, dim): MSE part + sqrt(pi/2)/m * gamma * S^T signs."""
        q = self._consts(indices)
        return torch.ops.tq.decompress(indices, norms, signs, residual_norms, q.rotation,
                                       q.centroids, q.qjl, self.index_bits, dtype)

    def scores(self, query: Tensor, indices: Tensor, norms: Tensor, signs: Tensor,
               residual_norms: Tensor) -> Tensor:
        """Unbiased unscaled <query, x> estimates (B, Hq, Lq, S) in the query dtype."""
        q = self._consts(indices)
        return torch.ops.tq.scores(query, indices, norms, signs, residual_norms, q.rotation,
                                   q.centroids, q.qjl, self.index_bits)
