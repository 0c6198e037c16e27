"""TurboQuant quantizers: the constant tensors of one (dim, bits, seed) and calls into `tq::` ops.

`TurboQuantMSE` stores norm + b-bit codes of the rotated unit vector (paper Alg. 1).
`TurboQuantProd` stores (b-1)-bit MSE codes + 1-bit QJL signs of the residual + the residual
norm (paper Alg. 2); its inner-product estimate is unbiased.
All tensors are (..., dim) with the (B, H, S) leading dims the ops expect.

The constants are built once per process for each (dim, bits, seed, qjl_dim, device) by
`constants` and shared by every quantizer and cache layer that asks for them: treat them as
read-only. `make_quantizers` builds the (key, value) pair of a cache layer or attention site
from user settings (`KEY_QUANTIZERS` names the key quantizers).
"""

import functools

import torch
from torch import Tensor, nn

from . import checks, ops  # noqa: F401  (ops registers torch.ops.tq)
from .codebook import lloyd_max
from .rotation import haar_rotation, qjl_matrix


def device_key(device: torch.device | str) -> torch.device:
    """`device` with its index filled in ("cuda" -> "cuda:0"), so that one device is one key."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        device = torch.empty(0, device=device).device
    return device


@functools.lru_cache(maxsize=None)
def _rotation(dim: int, seed: int, device: torch.device) -> Tensor:
    return haar_rotation(dim, seed).to(device)


@functools.lru_cache(maxsize=None)
def _centroids(dim: int, bits: int, device: torch.device) -> Tensor:
    return (lloyd_max(dim, bits).float() if bits > 0 else torch.zeros(1)).to(device)


@functools.lru_cache(maxsize=None)
def _qjl(rows: int, dim: int, seed: int, device: torch.device) -> Tensor:
    return qjl_matrix(rows, dim, seed).to(device)


def constants(dim: int, index_bits: int, seed: int, qjl_dim: int | None,
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor | None]:
    """(rotation (dim, dim), centroids (2**index_bits,), QJL matrix (qjl_dim, dim) or None),
    float32 on `device`: the same tensor objects for the same arguments (one copy per process).

    index_bits = 0 (Prod keys at 1 bit) gives the single centroid 0.
    """
    device = device_key(device)
    qjl = None if qjl_dim is None else _qjl(qjl_dim, dim, seed, device)
    return _rotation(dim, seed, device), _centroids(dim, index_bits, device), qjl


def _check_bits(bits: int, low: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= 8:
        raise ValueError(f"bits must be an int in [{low}, 8], got {bits!r}")


def _check_norm_dtype(norm_dtype: torch.dtype) -> None:
    if norm_dtype not in checks.NORM_DTYPES:
        raise TypeError(f"norm_dtype must be float16, bfloat16 or float32, got {norm_dtype}")


class _Quantizer(nn.Module):
    """Holds the constants (non-persistent buffers rotation, centroids, qjl) of one
    (dim, index_bits, seed, qjl_dim)."""

    dim: int
    index_bits: int
    seed: int
    qjl_dim: int | None

    def _register(self, tensors: tuple[Tensor, Tensor, Tensor | None]) -> None:
        for name, tensor in zip(("rotation", "centroids", "qjl"), tensors):
            self.register_buffer(name, tensor, persistent=False)

    def constants_on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """(rotation, centroids, qjl) on `device`: the buffers where they are, else the shared
        copies for that device (a call never moves the buffers). While tracing, a copy of the
        buffers in the graph: the shared copies are drawn on the host."""
        own = (self.rotation, self.centroids, self.qjl)
        if self.rotation.device == device:
            return own
        if torch.compiler.is_compiling():
            return tuple(None if t is None else t.to(device) for t in own)
        return constants(self.dim, self.index_bits, self.seed, self.qjl_dim, device)


class TurboQuantMSE(_Quantizer):
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
        self.seed, self.qjl_dim = seed, None
        self._register(constants(dim, bits, seed, None))

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, H, S, dim) -> (indices uint8 (B, H, S, bits*dim/8), norms (B, H, S, 1))."""
        checks.tensor("x", x, ndim=4, dtypes=checks.FLOAT_DTYPES)
        rotation, centroids, _ = self.constants_on(x.device)
        indices, norms, _, _ = torch.ops.tq.compress(x, rotation, centroids, None,
                                                     self.index_bits, self.norm_dtype)
        return indices, norms

    def dequantize(self, indices: Tensor, norms: Tensor,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Packed fields -> (B, H, S, dim) in `dtype`."""
        rotation, centroids, _ = self.constants_on(indices.device)
        return torch.ops.tq.decompress(indices, norms, None, None, rotation, centroids, None,
                                       self.index_bits, dtype)

    def scores(self, query: Tensor, indices: Tensor, norms: Tensor) -> Tensor:
        """Unscaled <query, x_hat> logits (B, Hq, Lq, S) in the query dtype (biased by 1 - D_b)."""
        rotation, centroids, _ = self.constants_on(indices.device)
        return torch.ops.tq.scores(query, indices, norms, None, None, rotation, centroids, None,
                                   self.index_bits)


class TurboQuantProd(_Quantizer):
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
        self.seed, self.qjl_dim = seed, qjl_dim
        self._register(constants(dim, bits - 1, seed, qjl_dim))

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, H, S, dim) -> (indices, norms, signs uint8 (B, H, S, qjl_dim/8), residual_norms)."""
        checks.tensor("x", x, ndim=4, dtypes=checks.FLOAT_DTYPES)
        out = torch.ops.tq.compress(x, *self.constants_on(x.device), self.index_bits,
                                    self.norm_dtype)
        return out

    def dequantize(self, indices: Tensor, norms: Tensor, signs: Tensor, residual_norms: Tensor,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Packed fields -> (B, H, S, dim): MSE part + sqrt(pi/2)/m * gamma * S^T signs."""
        return torch.ops.tq.decompress(indices, norms, signs, residual_norms,
                                       *self.constants_on(indices.device), self.index_bits, dtype)

    def scores(self, query: Tensor, indices: Tensor, norms: Tensor, signs: Tensor,
               residual_norms: Tensor) -> Tensor:
        """Unbiased unscaled <query, x> estimates (B, Hq, Lq, S) in the query dtype."""
        return torch.ops.tq.scores(query, indices, norms, signs, residual_norms,
                                   *self.constants_on(indices.device), self.index_bits)


KEY_QUANTIZERS = ("mse", "prod")
DEFAULT_KEY_QUANTIZER = "mse"  # measured: see README, "Key quantizer choice"


def check_key_quantizer(key_quantizer: str, qjl_dim: int | None = None) -> None:
    """Refuse a key quantizer name not in KEY_QUANTIZERS, and qjl_dim for keys without QJL."""
    if key_quantizer not in KEY_QUANTIZERS:
        raise ValueError(f"key_quantizer must be one of {KEY_QUANTIZERS}, got {key_quantizer!r}")
    if qjl_dim is not None and key_quantizer != "prod":
        raise ValueError(f"qjl_dim applies to key_quantizer='prod' only, got "
                         f"key_quantizer={key_quantizer!r}")


def make_quantizers(head_dim: int, k_bits: int, v_bits: int,
                    key_quantizer: str = DEFAULT_KEY_QUANTIZER, seed: int = 0,
                    qjl_dim: int | None = None, norm_dtype: torch.dtype = torch.float16, *,
                    v_head_dim: int | None = None) -> tuple[_Quantizer, TurboQuantMSE]:
    """(key quantizer, value quantizer) at k_bits / v_bits user bits per coordinate.

    Keys: `TurboQuantMSE` ("mse") or `TurboQuantProd` ("prod": k_bits - 1 MSE bits + 1 QJL bit,
    qjl_dim rows, default head_dim) with `seed`; values: `TurboQuantMSE` with seed + 1. Both
    store norms in norm_dtype. v_head_dim: the values' head_dim where it differs from the keys'.
    """
    check_key_quantizer(key_quantizer, qjl_dim)
    if key_quantizer == "prod":
        keys = TurboQuantProd(head_dim, k_bits, seed, qjl_dim=qjl_dim, norm_dtype=norm_dtype)
    else:
        keys = TurboQuantMSE(head_dim, k_bits, seed, norm_dtype=norm_dtype)
    v_dim = head_dim if v_head_dim is None else v_head_dim
    return keys, TurboQuantMSE(v_dim, v_bits, seed + 1, norm_dtype=norm_dtype)
