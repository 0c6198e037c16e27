"""KV-cache compressors with the API of `turboquant_vllm.compressors`, on bit-packed storage.

Tensors are (batch, heads, seq_len, head_dim). Unlike the earlier package, indices are
bit-packed uint8 (not one int64 per coordinate), norms are float16, the QJL correction is
unbiased, and scoring never allocates (q_len x kv_len x head_dim).
"""

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import checks
from .quantizer import TurboQuantMSE, TurboQuantProd


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


@dataclass
class CompressedValues(_Sized):
    """Compressed values (MSE): indices uint8 (batch, heads, seq, packed_bytes(head_dim, bits)),
    norms (batch, heads, seq, 1) float16."""

    indices: Tensor
    norms: Tensor
    original_dtype: torch.dtype = torch.float16


class _Compressor:
    """Holds one quantizer; `_compress` validates (batch, heads, seq, head_dim) input."""

    quantizer_type: type

    def __init__(self, head_dim: int, bits: int = 3, seed: int = 42):
        self.quantizer = self.quantizer_type(head_dim, bits, seed)
        self.bits, self.head_dim = bits, head_dim

    def _check(self, name: str, x) -> None:
        checks.tensor(name, x, ndim=4, dtypes=checks.FLOAT_DTYPES)
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"{name} has head_dim {x.shape[-1]}, the compressor expects "
                             f"{self.head_dim}")

    def _compress(self, name: str, x, container):
        self._check(name, x)
        return container(*self.quantizer.quantize(x), original_dtype=x.dtype)


class TurboQuantCompressorV2(_Compressor):
    """Key compressor: TurboQuantProd ((bits-1)-bit MSE + 1-bit QJL), unbiased q.k scores."""

    quantizer_type = TurboQuantProd

    def compress(self, keys: Tensor) -> CompressedKeys:
        """keys (batch, heads, seq_len, head_dim) -> CompressedKeys."""
        return self._compress("keys", keys, CompressedKeys)

    def decompress(self, compressed: CompressedKeys) -> Tensor:
        """Reconstruction (MSE part + QJL term) in the original dtype.

        For attention prefer `asymmetric_attention_scores`, which never reconstructs keys.
        """
        c = compressed
        return self.quantizer.dequantize(c.indices, c.norms, c.qjl_signs, c.residual_norms,
                                         c.original_dtype)

    def asymmetric_attention_scores(self, query: Tensor, compressed: CompressedKeys) -> Tensor:
        """Unscaled logits (batch, heads, q_len, kv_len) in the query dtype.

        query (batch, q_heads, q_len, head_dim); q_heads a multiple of the key heads (GQA).
        """
        self._check("query", query)
        c = compressed
        return self.quantizer.scores(query, c.indices, c.norms, c.qjl_signs, c.residual_norms)


class TurboQuantCompressorMSE(_Compressor):
    """Value compressor: TurboQuantMSE, `bits` bits per coordinate."""

    quantizer_type = TurboQuantMSE

    def compress(self, values: Tensor) -> CompressedValues:
        """values (batch, heads, seq_len, head_dim) -> CompressedValues."""
        return self._compress("values", values, CompressedValues)

    def decompress(self, compressed: CompressedValues) -> Tensor:
        """Reconstruction (batch, heads, seq_len, head_dim) in the original dtype."""
        return self.quantizer.dequantize(compressed.indices, compressed.norms,
                                         compressed.original_dtype)
