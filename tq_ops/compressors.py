"""KV-cache compressors with the API of `turboquant_vllm.compressors`, on bit-packed storage.

Tensors are (batch, heads, seq_len, head_dim), float16 / bfloat16 / float32 / float64 (as
in the earlier package, float64 is computed in float32 and returned in float64). Unlike the
earlier package, indices are bit-packed uint8 (not one int64 per coordinate), norms are
float16 (`norm_dtype`), the QJL correction is unbiased, and scoring never allocates
(q_len x kv_len x head_dim).
"""

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import checks
from .norms import vector_norms
from .quantizer import TurboQuantMSE, TurboQuantProd
from .rotation import check_seed

_DTYPES = checks.FLOAT_DTYPES + (torch.float64,)


def _narrow(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in: float32 for float64 (their widest), else `dtype`."""
    return torch.float32 if dtype == torch.float64 else dtype


class _Sized:
    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(v.numel() * v.element_size() for f in fields(self)
                   if isinstance(v := getattr(self, f.name), Tensor))


@dataclass
class CompressedKeys(_Sized):
    """Compressed keys (Prod): attention scores come straight from these fields.

    indices: packed codes uint8 (batch, heads, seq, packed_bytes(head_dim, bits - 1));
    norms: (batch, heads, seq, 1) float16; qjl_signs: packed sign bits uint8
    (batch, heads, seq, qjl_dim / 8); residual_norms: (batch, heads, seq, 1) float16.
    """

    indices: Tensor
    norms: Tensor
    qjl_signs: Tensor
    residual_norms: Tensor
    original_dtype: torch.dtype = torch.float16
    compressed_by: tuple | None = None  # (head_dim, bits, seed, norm_dtype); None: unchecked


@dataclass
class CompressedValues(_Sized):
    """Compressed values (MSE): indices uint8 (batch, heads, seq, packed_bytes(head_dim, bits)),
    norms (batch, heads, seq, 1) float16."""

    indices: Tensor
    norms: Tensor
    original_dtype: torch.dtype = torch.float16
    compressed_by: tuple | None = None  # (head_dim, bits, seed, norm_dtype); None: unchecked


class _Compressor:
    """Holds one quantizer; `_compress` validates (batch, heads, seq, head_dim) input.

    norm_dtype: dtype of the stored norms; float32 holds norms beyond the float16 range.
    """

    quantizer_type: type
    container: type

    def __init__(self, head_dim: int, bits: int = 3, seed: int = 42, *,
                 norm_dtype: torch.dtype = torch.float16):
        checks.head_dim("head_dim", head_dim)
        check_seed(seed)  # before the quantizer's constant caches, where True would hit 1
        self.quantizer = self.quantizer_type(head_dim, bits, seed, norm_dtype=norm_dtype)
        self.bits, self.head_dim = bits, head_dim
        self.settings = (head_dim, bits, seed, norm_dtype)

    def _check(self, name: str, x) -> None:
        checks.tensor(name, x, ndim=4, dtypes=_DTYPES)
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"{name} has head_dim {x.shape[-1]}, the compressor expects "
                             f"{self.head_dim}")

    def _compress(self, name: str, x):
        self._check(name, x)
        if x.dtype == torch.float64 and checks.can_sync(x):  # before float32 flushes tiny ones
            checks.storable_norms(name, vector_norms(x), self.quantizer.norm_dtype)
        fields = self.quantizer.quantize(x.to(_narrow(x.dtype)))
        return self.container(*fields, original_dtype=x.dtype, compressed_by=self.settings)

    def _check_compressed(self, compressed) -> None:
        if not isinstance(compressed, self.container):
            raise TypeError(f"compressed must be a {self.container.__name__} (from "
                            f"{type(self).__name__}.compress), got {type(compressed).__name__}")
        by = compressed.compressed_by
        if by is not None and by != self.settings:  # another rotation or codebook: garbage
            raise ValueError(f"compressed by a compressor with (head_dim, bits, seed, norm_dtype)"
                             f" = {by}, this one has {self.settings}")


class TurboQuantCompressorV2(_Compressor):
    """Key compressor: TurboQuantProd ((bits-1)-bit MSE + 1-bit QJL), unbiased q.k scores."""

    quantizer_type, container = TurboQuantProd, CompressedKeys

    def compress(self, keys: Tensor) -> CompressedKeys:
        """keys (batch, heads, seq_len, head_dim) -> CompressedKeys."""
        return self._compress("keys", keys)

    def decompress(self, compressed: CompressedKeys) -> Tensor:
        """Reconstruction (MSE part + QJL term) in the original dtype.

        For attention prefer `asymmetric_attention_scores`, which never reconstructs keys.
        """
        self._check_compressed(compressed)
        c = compressed
        out = self.quantizer.dequantize(c.indices, c.norms, c.qjl_signs, c.residual_norms,
                                        _narrow(c.original_dtype))
        return out.to(c.original_dtype)

    def asymmetric_attention_scores(self, query: Tensor, compressed: CompressedKeys) -> Tensor:
        """Unscaled logits (batch, heads, q_len, kv_len) in the query dtype.

        query (batch, q_heads, q_len, head_dim); q_heads a multiple of the key heads (GQA).
        """
        self._check("query", query)
        self._check_compressed(compressed)
        c = compressed
        out = self.quantizer.scores(query.to(_narrow(query.dtype)), c.indices, c.norms,
                                    c.qjl_signs, c.residual_norms)
        return out.to(query.dtype)


class TurboQuantCompressorMSE(_Compressor):
    """Value compressor: TurboQuantMSE, `bits` bits per coordinate."""

    quantizer_type, container = TurboQuantMSE, CompressedValues

    def compress(self, values: Tensor) -> CompressedValues:
        """values (batch, heads, seq_len, head_dim) -> CompressedValues."""
        return self._compress("values", values)

    def decompress(self, compressed: CompressedValues) -> Tensor:
        """Reconstruction (batch, heads, seq_len, head_dim) in the original dtype."""
        self._check_compressed(compressed)
        out = self.quantizer.dequantize(compressed.indices, compressed.norms,
                                        _narrow(compressed.original_dtype))
        return out.to(compressed.original_dtype)
