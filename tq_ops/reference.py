"""Plain-torch reference of every `tq::` op: the CPU implementation and the test oracle.

Semantics are those of ARCHITECTURE.md; the readers take the packed fields as `PackedKeys` /
`PackedValues` (`packed.py`), compress as the op does. Keys and values are processed in
chunks along the sequence, so temporaries stay within CHUNK_ELEMENTS per tensor (or one key's
worth of rows): `scores` holds nothing of q_len x kv_len beyond its output, and `attention`
nothing of it at all (an online softmax over key chunks, stopping at max(kv_lens)).
"""

import math

import torch
from torch import Tensor

from . import checks, masks
from .codebook import full_table
from .norms import unit_and_norm
from .packed import ExactTokens, PackedKeys, PackedValues
from .packing import pack, unpack

CHUNK_ELEMENTS = 1 << 18  # decoded (batch x heads x tokens x dim) elements per chunk


def _chunks(rows: int, length: int):
    """Slices of [0, length) of at most CHUNK_ELEMENTS // rows keys (at least one); rows is the
    number of elements a temporary holds per key."""
    step = max(1, CHUNK_ELEMENTS // max(1, rows))
    return (slice(start, min(start + step, length)) for start in range(0, length, step))


def _codes_to_unit(indices: Tensor, centroids: Tensor, index_bits: int, dim: int) -> Tensor:
    """Packed codes (..., P) -> centroid values in the rotated domain (..., dim) float32."""
    return full_table(centroids, index_bits)[unpack(indices, index_bits, dim)]


def _signs(signs: Tensor, rows: int) -> Tensor:
    """Packed QJL bits (..., P) -> +-1 float32 (..., rows)."""
    return unpack(signs, 1, rows).float() * 2 - 1


def compress(x: Tensor, rotation: Tensor, centroids: Tensor, qjl: Tensor | None, index_bits: int,
             norm_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, H, S, D) -> indices, norms, signs, residual_norms (layout in ARCHITECTURE.md)."""
    centroids = full_table(centroids, index_bits)
    unit, norms = unit_and_norm(x.contiguous())
    rotated = unit @ rotation.T
    codes = torch.bucketize(rotated, (centroids[1:] + centroids[:-1]) / 2)
    indices = pack(codes, index_bits)
    empty = x.new_empty(x.shape[:-1] + (0,))
    if qjl is None:
        return indices, norms.to(norm_dtype), empty.to(torch.uint8), empty.to(norm_dtype)
    residual_rotated = rotated - centroids[codes]
    residual = residual_rotated @ rotation
    signs = pack((residual @ qjl.T >= 0).to(torch.int32), 1)
    residual_norms = torch.linalg.vector_norm(residual_rotated, dim=-1, keepdim=True)
    return indices, norms.to(norm_dtype), signs, residual_norms.to(norm_dtype)


def compress_into(x: Tensor, rotation: Tensor, centroids: Tensor, qjl: Tensor | None,
                  index_bits: int, positions: Tensor, indices: Tensor, norms: Tensor,
                  signs: Tensor | None, residual_norms: Tensor | None) -> None:
    """Compress x (B, H, S, D) and write token s into slot positions[s] of each buffer; tokens
    whose position lies outside [0, S_max) are skipped, as the CUDA kernel skips them."""
    inside = (positions >= 0) & (positions < indices.shape[2])
    fresh = compress(x[:, :, inside], rotation, centroids, qjl, index_bits, norms.dtype)
    for buffer, new in zip((indices, norms, signs, residual_norms), fresh):
        if buffer is not None:
            buffer.index_copy_(2, positions[inside], new.to(buffer.dtype))


def decompress(keys: PackedKeys, dtype: torch.dtype) -> Tensor:
    """Reconstruct (B, H, S, D) in `dtype`: norm * (Pi^T c[idx] + QJL term)."""
    dim = keys.rotation.shape[0]
    unit = _codes_to_unit(keys.indices, keys.centroids, keys.index_bits, dim) @ keys.rotation
    if keys.qjl is not None:
        rows = keys.qjl.shape[0]
        scale = keys.residual_norms.float() * (math.sqrt(math.pi / 2) / rows)
        unit = unit + scale * (_signs(keys.signs, rows) @ keys.qjl)
    return (keys.norms.float() * unit).to(dtype).contiguous()


def _queries(query: Tensor, kv_heads: int, rotation: Tensor,
             qjl: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """query (B, Hq, Lq, D) -> (Pi q, sqrt(pi/2)/m * S q or None), float32 (B, Hkv, G * Lq, .):
    query head h is group head h % G of kv head h // G; a group's rows share each key, so the
    products with keys (B, Hkv, chunk, .) never copy a key per group head."""
    batch, q_heads, q_len, dim = query.shape
    grouped = query.float().reshape(batch, kv_heads, q_heads // kv_heads * q_len, dim)
    sketch = None if qjl is None else grouped @ qjl.T * (math.sqrt(math.pi / 2) / qjl.shape[0])
    return grouped @ rotation.T, sketch


def _key_logits(q_rotated: Tensor, q_sketch: Tensor | None, part: slice,
                keys: PackedKeys) -> Tensor:
    """Unscaled q.k estimates of the keys in `part`: float32 (B, Hkv, G * Lq, len(part))."""
    units = _codes_to_unit(keys.indices[:, :, part], keys.centroids, keys.index_bits,
                           q_rotated.shape[-1])
    logits = q_rotated @ units.transpose(-1, -2)
    if q_sketch is not None:
        sign = _signs(keys.signs[:, :, part], q_sketch.shape[-1])
        gamma = keys.residual_norms[:, :, part].float().transpose(-1, -2)
        logits += gamma * (q_sketch @ sign.transpose(-1, -2))
    return logits * keys.norms[:, :, part].float().transpose(-1, -2)


def _rows_per_key(query: Tensor, kv_heads: int, *dims: int) -> int:
    """Elements per key of the largest chunk temporary: the logits (B * Hq * Lq) or a decoded
    key / value / sign row (B * Hkv * dim)."""
    return max(query.shape[0] * query.shape[1] * query.shape[2],
               query.shape[0] * kv_heads * max(dims))


def _qjl_rows(keys: PackedKeys) -> int:
    return 0 if keys.qjl is None else keys.qjl.shape[0]


def scores(query: Tensor, keys: PackedKeys) -> Tensor:
    """Unscaled attention logits (B, Hq, Lq, Lk) in the query dtype."""
    kv_heads, kv_len = keys.indices.shape[1], keys.indices.shape[2]
    q_rotated, q_sketch = _queries(query, kv_heads, keys.rotation, keys.qjl)
    out = query.new_empty(tuple(query.shape[:-1]) + (kv_len,))
    rows = _rows_per_key(query, kv_heads, keys.rotation.shape[0], _qjl_rows(keys))
    for part in _chunks(rows, kv_len):
        logits = _key_logits(q_rotated, q_sketch, part, keys)
        out[..., part] = logits.view(out.shape[:-1] + (-1,))
    return out


def _exact_part(exact: ExactTokens, lengths: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Which key positions `keys` (K,) are read exact, bool (B, 1, 1, K), and their slots in
    the `ExactTokens` buffers (K,)."""
    is_exact = masks.exact_keys(lengths, exact.start.to(lengths), exact.sinks, keys)
    slots = masks.exact_slots(keys, exact.sinks, exact.keys.shape[2] - exact.sinks)
    return is_exact[:, None, None, :], slots


def attention(query: Tensor, keys: PackedKeys, values: PackedValues, scale: float,
              is_causal: bool, attn_mask: Tensor | None, kv_lens: Tensor | None,
              exact: ExactTokens | None = None) -> Tensor:
    """softmax(scale * q.k + mask) @ v_hat: (B, Hq, Lq, Dv) in the query dtype; with `exact`,
    its positions read k and v from the exact buffers instead of k_hat and v_hat.

    Online softmax over chunks of keys (running row max, sum and unnormalised output, float32,
    values in the rotated domain), so no temporary holds more than one chunk of keys; keys
    from max(kv_lens) on are never read (kv_lens is read on the host unless a CUDA graph is
    being captured). Rows that see no key give 0.
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads, kv_len = values.indices.shape[1], values.indices.shape[2]
    lengths = masks.lengths(batch, kv_len, kv_lens, query.device)
    stop = kv_len
    if kv_lens is not None and checks.can_sync(kv_lens):
        stop = min(kv_len, int(lengths.max())) if batch else 0
    q_rotated, q_sketch = _queries(query, kv_heads, keys.rotation, keys.qjl)
    mask = None if attn_mask is None else attn_mask.expand(batch, q_heads, q_len, kv_len)
    v_dim = values.rotation.shape[0]
    grid = (batch, kv_heads, q_heads // kv_heads, q_len)  # the rows (B, Hkv, G * Lq) unflattened
    rows = grid + (1,)
    peak = q_rotated.new_full(rows, -math.inf)  # running max of the logits seen so far
    total = q_rotated.new_zeros(rows)  # running sum of exp(logit - peak)
    acc = q_rotated.new_zeros(rows[:-1] + (v_dim,))  # running sum of exp(logit - peak) * v
    rows_per_key = _rows_per_key(query, kv_heads, keys.rotation.shape[0], v_dim, _qjl_rows(keys))
    for part in _chunks(rows_per_key, stop):
        slots = torch.arange(part.start, part.stop, device=query.device)
        logits = _key_logits(q_rotated, q_sketch, part, keys)
        if exact is not None:  # exact k and v, rotated like the codes (Pi orthogonal)
            is_exact, exact_slots = _exact_part(exact, lengths, slots)
            exact_k = exact.keys.index_select(2, exact_slots).float() @ keys.rotation.T
            logits = torch.where(is_exact, q_rotated @ exact_k.transpose(-1, -2), logits)
        logits = logits.view(grid + (-1,)) * scale
        keep = masks.visible_keys(lengths, q_len, slots, is_causal)[:, None, None]  # B,1,1,Lq,chunk
        if mask is not None and mask.dtype == torch.bool:
            keep = keep & mask[..., part].unflatten(1, (kv_heads, -1))
        elif mask is not None:
            logits = logits + mask[..., part].unflatten(1, (kv_heads, -1)).float()
        logits = logits.masked_fill(~keep, -math.inf)
        new_peak = torch.maximum(peak, logits.amax(-1, keepdim=True))
        shift = torch.where(new_peak == -math.inf, 0.0, new_peak)  # rows with no key yet
        probs = torch.exp(logits - shift)
        decay = torch.exp(peak - shift)
        decoded = _codes_to_unit(values.indices[:, :, part], values.centroids, values.index_bits,
                                 v_dim) * values.norms[:, :, part].float()
        if exact is not None:
            exact_v = exact.values.index_select(2, exact_slots).float() @ values.rotation.T
            decoded = torch.where(is_exact.transpose(-1, -2), exact_v, decoded)
        total = total * decay + probs.sum(-1, keepdim=True)
        acc = acc * decay + (probs.flatten(2, 3) @ decoded).view(acc.shape)
        peak = new_peak
    out = torch.where(total > 0, acc / torch.where(total > 0, total, 1.0), 0.0) @ values.rotation
    return out.flatten(1, 2).to(query.dtype).contiguous()
