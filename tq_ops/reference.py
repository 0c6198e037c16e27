"""Plain-torch reference of every `tq::` op: the CPU implementation and the test oracle.

Signatures and semantics are those of ARCHITECTURE.md. Keys and values are processed in
chunks along the sequence so that no temporary grows like q_len x kv_len x head_dim.
"""

import math

import torch
from torch import Tensor

from .masks import visible
from .packing import pack, unpack

CHUNK_ELEMENTS = 1 << 18  # decoded (batch x heads x tokens x dim) elements per chunk


def _chunks(batch: int, heads: int, dim: int, length: int):
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * dim))
    return (slice(start, start + step) for start in range(0, length, step))


def _codes_to_unit(indices: Tensor, centroids: Tensor, bits: int, dim: int) -> Tensor:
    """Packed codes (..., P) -> centroid values in the rotated domain (..., dim) float32."""
    return centroids[unpack(indices, bits, dim)]


def _signs(signs: Tensor, rows: int) -> Tensor:
    """Packed QJL bits (..., P) -> +-1 float32 (..., rows)."""
    return unpack(signs, 1, rows).float() * 2 - 1


def compress(x: Tensor, rotation: Tensor, centroids: Tensor, qjl: Tensor | None, bits: int,
             norm_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, H, S, D) -> indices, norms, signs, residual_norms (layout in ARCHITECTURE.md)."""
    xf = x.float().contiguous()
    norms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    unit = torch.where(norms > 0, xf / norms, 0.0)
    rotated = unit @ rotation.T
    codes = torch.bucketize(rotated, (centroids[1:] + centroids[:-1]) / 2)
    indices = pack(codes, bits)
    empty = x.new_empty(x.shape[:-1] + (0,))
    if qjl is None:
        return indices, norms.to(norm_dtype), empty.to(torch.uint8), empty.to(norm_dtype)
    residual_rotated = rotated - centroids[codes]
    residual = residual_rotated @ rotation
    signs = pack((residual @ qjl.T >= 0).to(torch.int32), 1)
    residual_norms = torch.linalg.vector_norm(residual_rotated, dim=-1, keepdim=True)
    return indices, norms.to(norm_dtype), signs, residual_norms.to(norm_dtype)


def compress_into(x: Tensor, rotation: Tensor, centroids: Tensor, qjl: Tensor | None, bits: int,
                  positions: Tensor, indices: Tensor, norms: Tensor, signs: Tensor | None,
                  residual_norms: Tensor | None) -> None:
    """Compress x (B, H, S, D) and write token s into slot positions[s] of each buffer."""
    fresh = compress(x, rotation, centroids, qjl, bits, norms.dtype)
    for buffer, new in zip((indices, norms, signs, residual_norms), fresh):
        if buffer is not None:
            buffer.index_copy_(2, positions, new.to(buffer.dtype))


def decompress(indices: Tensor, norms: Tensor, signs: Tensor | None,
               residual_norms: Tensor | None, rotation: Tensor, centroids: Tensor,
               qjl: Tensor | None, bits: int, dtype: torch.dtype) -> Tensor:
    """Reconstruct (B, H, S, D) in `dtype`: norm * (Pi^T c[idx] + QJL term)."""
    dim = rotation.shape[0]
    unit = _codes_to_unit(indices, centroids, bits, dim) @ rotation
    if qjl is not None:
        rows = qjl.shape[0]
        scale = residual_norms.float() * (math.sqrt(math.pi / 2) / rows)
        unit = unit + scale * (_signs(signs, rows) @ qjl)
    return (norms.float() * unit).to(dtype).contiguous()


def _logits(query: Tensor, indices: Tensor, norms: Tensor, signs: Tensor | None,
            residual_norms: Tensor | None, rotation: Tensor, centroids: Tensor,
            qjl: Tensor | None, bits: int, out_dtype: torch.dtype) -> Tensor:
    """Unscaled q.k estimates (B, Hq, Lq, Lk) in out_dtype, computed chunk by chunk."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = indices.shape[1], indices.shape[2]
    grouped = query.float().unflatten(1, (kv_heads, q_heads // kv_heads))  # (B, Hkv, G, Lq, D)
    q_rotated = grouped @ rotation.T
    q_sketch = None if qjl is None else grouped @ qjl.T * (math.sqrt(math.pi / 2) / qjl.shape[0])
    out = query.new_empty((batch, q_heads, q_len, kv_len), dtype=out_dtype)
    for part in _chunks(batch, kv_heads, dim, kv_len):
        keys = _codes_to_unit(indices[:, :, part], centroids, bits, dim).unsqueeze(2)
        logits = q_rotated @ keys.transpose(-1, -2)  # (B, Hkv, G, Lq, chunk)
        if q_sketch is not None:
            sign = _signs(signs[:, :, part], qjl.shape[0]).unsqueeze(2)
            gamma = residual_norms[:, :, part].float().transpose(-1, -2).unsqueeze(2)
            logits += gamma * (q_sketch @ sign.transpose(-1, -2))
        logits *= norms[:, :, part].float().transpose(-1, -2).unsqueeze(2)
        out[..., part] = logits.flatten(1, 2)
    return out


def scores(query: Tensor, indices: Tensor, norms: Tensor, signs: Tensor | None,
           residual_norms: Tensor | None, rotation: Tensor, centroids: Tensor,
           qjl: Tensor | None, bits: int) -> Tensor:
    """Unscaled attention logits (B, Hq, Lq, Lk) in the query dtype."""
    return _logits(query, indices, norms, signs, residual_norms, rotation, centroids, qjl, bits,
                   query.dtype)


def attention(query: Tensor, k_indices: Tensor, k_norms: Tensor, k_signs: Tensor | None,
              k_residual_norms: Tensor | None, k_rotation: Tensor, k_centroids: Tensor,
              k_qjl: Tensor | None, k_bits: int, v_indices: Tensor, v_norms: Tensor,
              v_rotation: Tensor, v_centroids: Tensor, v_bits: int, scale: float,
              is_causal: bool, attn_mask: Tensor | None, kv_lens: Tensor | None) -> Tensor:
    """softmax(scale * q.k + mask) @ v_hat: (B, Hq, Lq, Dv) in the query dtype."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, kv_len = v_indices.shape[1], v_indices.shape[2]
    logits = _logits(query, k_indices, k_norms, k_signs, k_residual_norms, k_rotation,
                     k_centroids, k_qjl, k_bits, torch.float32) * scale
    keep = visible(batch, q_len, kv_len, is_causal, kv_lens, query.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
    elif attn_mask is not None:
        logits = logits + attn_mask.float()
    logits = logits.masked_fill(~keep, -math.inf)
    masked_row = (logits == -math.inf).all(-1, keepdim=True)  # also true for an empty cache
    probs = torch.where(masked_row, 0.0, torch.softmax(logits, -1))
    probs = probs.unflatten(1, (kv_heads, q_heads // kv_heads))  # (B, Hkv, G, Lq, Lk)
    v_dim = v_rotation.shape[0]
    out = probs.new_zeros(probs.shape[:-1] + (v_dim,))
    for part in _chunks(batch, kv_heads, v_dim, kv_len):
        values = _codes_to_unit(v_indices[:, :, part], v_centroids, v_bits, v_dim)
        values = values * v_norms[:, :, part].float()
        out += probs[..., part] @ values.unsqueeze(2)
    return (out @ v_rotation).flatten(1, 2).to(query.dtype).contiguous()
