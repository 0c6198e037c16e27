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
from .codebook import half_table, lloyd_max
from .packed import PackedKeys, PackedValues
from .rotation import check_seed, haar_rotation, qjl_matrix


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
    return (half_table(lloyd_max(dim, bits).float()) if bits > 0 else torch.zeros(1)).to(device)


@functools.lru_cache(maxsize=None)
def _qjl(rows: int, dim: int, seed: int, device: torch.device) -> Tensor:
    return qjl_matrix(rows, dim, seed).to(device)


def constants(dim: int, index_bits: int, seed: int, qjl_dim: int | None,
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor | None]:
    """(rotation (dim, dim), centroids (2**(index_bits-1),), QJL matrix (qjl_dim, dim) or None),
    float32 on `device`: the same tensor objects for the same arguments (one copy per process).

    centroids is the upper half of the symmetric Lloyd-Max codebook (`codebook.half_table`, the
    form the kernels specialise on; `codebook.full_table` mirrors it); index_bits = 0 (Prod keys
    at 1 bit) gives the single centroid 0.
    """
    device = device_key(device)
    qjl = None if qjl_dim is None else _qjl(qjl_dim, dim, seed, device)
    return _rotation(dim, seed, device), _centroids(dim, index_bits, device), qjl


@functools.lru_cache(maxsize=None)
def _plan(dim: int, index_bits: int, seed: int, qjl_dim: int | None,
          device: torch.device) -> Tensor | None:
    return ops.compress_plan(*constants(dim, index_bits, seed, qjl_dim, device), index_bits)


class TurboQuantizer(nn.Module):
    """Base of `TurboQuantMSE` and `TurboQuantProd`: validates the settings and holds the
    constants (non-persistent buffers rotation, centroids, qjl) of one
    (dim, index_bits, seed, qjl_dim). bits: user bits per coordinate; qjl_dim: QJL rows (Prod,
    whose index_bits are bits - 1: one bit goes to the QJL sign) or None (MSE, index_bits = bits).
    """

    def __init__(self, dim: int, bits: int, seed: int, qjl_dim: int | None,
                 norm_dtype: torch.dtype):
        super().__init__()
        checks.head_dim("dim", dim)
        checks.int_range("bits", bits, 1, 8)
        check_seed(seed)  # before the shared constants: seed=True would reuse seed 1's
        if norm_dtype not in checks.NORM_DTYPES:
            raise TypeError(f"norm_dtype must be float16, bfloat16 or float32, got {norm_dtype}")
        if qjl_dim is not None:
            checks.int_range("qjl_dim", qjl_dim, 1)
        index_bits = bits if qjl_dim is None else bits - 1
        self.dim, self.bits, self.index_bits, self.norm_dtype = dim, bits, index_bits, norm_dtype
        self.seed, self.qjl_dim = seed, qjl_dim
        tensors = constants(dim, index_bits, seed, qjl_dim)
        for name, tensor in zip(("rotation", "centroids", "qjl"), tensors):
            self.register_buffer(name, tensor, persistent=False)

    def constants_for(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(rotation, centroids, qjl) on the device of tensor x, to call the ops with: the
        buffers if they are there, else the shared copies for that device (a call never moves
        the buffers). While tracing, a copy of the buffers in the graph: the shared copies are
        drawn on the host."""
        own = (self.rotation, self.centroids, self.qjl)
        if self.rotation.device == x.device:
            return own
        if torch.compiler.is_compiling():
            return tuple(None if t is None else t.to(x.device) for t in own)
        return constants(self.dim, self.index_bits, self.seed, self.qjl_dim, x.device)

    def plan_for(self, x: Tensor) -> Tensor | None:
        """The compress `plan` (`ops.compress_plan`) for the device of x, built once per process
        and device; None on the CPU, and while tracing (the compress then builds its own)."""
        if torch.compiler.is_compiling():
            return None
        return _plan(self.dim, self.index_bits, self.seed, self.qjl_dim, device_key(x.device))

    def _compress(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        checks.tensor("x", x, ndim=4, dtypes=checks.FLOAT_DTYPES)
        return torch.ops.tq.compress(x, *self.constants_for(x), self.index_bits, self.norm_dtype,
                                     self.plan_for(x))

    def packed_keys(self, indices: Tensor, norms: Tensor, signs: Tensor | None = None,
                    residual_norms: Tensor | None = None) -> PackedKeys:
        """Fields of `quantize` or `tq::compress` with the constants on their device: what
        `tq::decompress`, `tq::scores` and `tq::attention` read as keys. MSE keys carry no
        signs or residual_norms (the zero-width ones of `tq::compress` are dropped)."""
        if self.qjl is None:
            signs = residual_norms = None
        return PackedKeys(indices, norms, signs, residual_norms, *self.constants_for(indices),
                          self.index_bits)


class TurboQuantMSE(TurboQuantizer):
    """MSE-optimal TurboQuant: `bits` bits per coordinate plus one norm per vector.

    Buffers: rotation (dim, dim) float32, centroids (2**(bits-1),) float32 (`constants`).
    """

    def __init__(self, dim: int, bits: int, seed: int = 42,
                 norm_dtype: torch.dtype = torch.float16):
        super().__init__(dim, bits, seed, None, norm_dtype)

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, H, S, dim) -> (indices uint8 (B, H, S, bits*dim/8), norms (B, H, S, 1))."""
        return self._compress(x)[:2]

    def dequantize(self, indices: Tensor, norms: Tensor,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Packed fields -> (B, H, S, dim) in `dtype`."""
        return torch.ops.tq.decompress(*self.packed_keys(indices, norms), dtype)

    def scores(self, query: Tensor, indices: Tensor, norms: Tensor) -> Tensor:
        """Unscaled <query, x_hat> logits (B, Hq, Lq, S) in the query dtype (biased by 1 - D_b)."""
        return torch.ops.tq.scores(query, *self.packed_keys(indices, norms))

    def packed_values(self, indices: Tensor, norms: Tensor) -> PackedValues:
        """Fields of `quantize` with the constants on their device: what `tq::attention`
        reads as values."""
        rotation, centroids, _ = self.constants_for(indices)
        return PackedValues(indices, norms, rotation, centroids, self.index_bits)


class TurboQuantProd(TurboQuantizer):
    """Inner-product TurboQuant: (bits-1)-bit MSE codes + 1-bit QJL of the residual.

    bits = 1 stores QJL signs only. Buffers: rotation (dim, dim), centroids (2**(bits-2),) or
    (1,) at bits = 1 (`constants`),
    qjl (qjl_dim, dim) with i.i.d. N(0, 1) entries, all float32.
    """

    def __init__(self, dim: int, bits: int, seed: int = 42, qjl_dim: int | None = None,
                 norm_dtype: torch.dtype = torch.float16):
        super().__init__(dim, bits, seed, dim if qjl_dim is None else qjl_dim, norm_dtype)

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, H, S, dim) -> (indices, norms, signs uint8 (B, H, S, qjl_dim/8), residual_norms)."""
        return self._compress(x)

    def dequantize(self, indices: Tensor, norms: Tensor, signs: Tensor, residual_norms: Tensor,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Packed fields -> (B, H, S, dim): MSE part + sqrt(pi/2)/m * gamma * S^T signs."""
        return torch.ops.tq.decompress(*self.packed_keys(indices, norms, signs, residual_norms),
                                       dtype)

    def scores(self, query: Tensor, indices: Tensor, norms: Tensor, signs: Tensor,
               residual_norms: Tensor) -> Tensor:
        """Unbiased unscaled <query, x> estimates (B, Hq, Lq, S) in the query dtype."""
        return torch.ops.tq.scores(query, *self.packed_keys(indices, norms, signs, residual_norms))


KEY_QUANTIZERS = ("mse", "prod")
DEFAULT_KEY_QUANTIZER = "mse"  # measured: see README, "Key quantizer choice"
DEFAULT_CENTER_KEYS = True  # subtract the keys' mean (exact for attention); measured: see README, "Quality evaluation"
KEY_SCALE_FLOOR = 1 / 32  # a channel's key scale is at least this fraction of the largest one


def key_channel_scale(keys: Tensor) -> Tensor:
    """Per-channel key scales (B, H, 1, D) float32 of keys (B, H, S, D): each channel's RMS
    over S (of centred keys: its spread), at least KEY_SCALE_FLOOR times the largest
    channel's (all ones where every channel is 0)."""
    rms = keys.float().square().mean(-2, keepdim=True).sqrt()
    floor = rms.amax(-1, keepdim=True) * KEY_SCALE_FLOOR
    return torch.where(floor > 0, torch.maximum(rms, floor), 1.0)


def scale_key_channels(query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """(query * s, keys / s) with s = `key_channel_scale(keys)` in the keys' dtype, repeated over
    each GQA group of query (B, Hq, L, D): the same logits, keys with channels of equal spread
    (the lever `scale_keys`)."""
    scale = key_channel_scale(keys).to(keys.dtype)
    return query * scale.repeat_interleave(query.shape[1] // keys.shape[1], 1), keys / scale


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
                    v_head_dim: int | None = None) -> tuple[TurboQuantizer, TurboQuantMSE]:
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
