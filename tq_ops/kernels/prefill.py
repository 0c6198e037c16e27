"""Prefill by decompression: fp16 SDPA over K and V decompressed from the packed cache.

Prefill is compute-bound: tensor-core attention over fp16 tiles beats the fused kernel,
which decodes every K/V tile once per query tile (BENCHMARKS.md). `ops.attention` decides
(`flash_prefill_applies`), decompresses K and V with the decompress kernel, and calls
`flash_prefill`. The cost is transient memory: the fp16 K and V, 4 * D bytes per cached
token per KV head (at D = 256 decompression also holds fp32 intermediates).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import visible
from ..packed import PackedKeys, PackedValues


def flash_prefill_applies(query: Tensor, keys: PackedKeys, values: PackedValues,
                          attn_mask: Tensor | None, kv_lens: Tensor | None) -> bool:
    """Whether prefill by decompression serves this `tq::attention` call (its arguments):
    more than 16 query rows per KV head, no mask or a bool one, equal K/V head dims, fp16
    norms (decompressed values then fit in fp16), and not a cache with kv_lens and at least
    twice as many slots as queries (a prefill into a preallocated cache): the fused kernel
    reads only the kv_lens slots there, while decompression reads and scores all of them."""
    _, q_heads, q_len, dk = query.shape
    kv_heads, kv_len = keys.indices.shape[1], keys.indices.shape[2]
    return (q_len * (q_heads // kv_heads) > 16 and kv_len > 0
            and (kv_lens is None or kv_len < 2 * q_len)
            and (attn_mask is None or attn_mask.dtype == torch.bool)
            and values.rotation.shape[0] == dk
            and keys.norms.dtype == values.norms.dtype == torch.float16)


def flash_prefill(query: Tensor, keys: Tensor, values: Tensor, scale: float, is_causal: bool,
                  attn_mask: Tensor | None, kv_lens: Tensor | None) -> Tensor:
    """softmax(scale * q.k + mask) @ v with `tq::attention`'s masking rules, by fp16 SDPA.

    query (B, Hq, Lq, D) any float dtype; keys, values (B, Hkv, Lk, D) float16, decompressed;
    attn_mask None or bool, broadcastable to (B, Hq, Lq, Lk); kv_lens (B,) int or None.
    Returns (B, Hq, Lq, D) in the query dtype. A plain call is one flash SDPA (GQA); a bool
    mask, ragged lengths or a causal chunk with fewer queries than keys become one fp16
    additive mask (0 where `masks.visible` & attn_mask, else -inf), built once and shared by
    one SDPA per group head (masked GQA SDPA has no fused backend in torch 2.11; a bool mask
    would be converted once per call). Rows that see no key give zeros.
    """
    query16 = query.to(torch.float16)
    q_heads, q_len, kv_len = query.shape[1], query.shape[2], keys.shape[2]
    if attn_mask is None and kv_lens is None and (not is_causal or q_len == kv_len):
        out = F.scaled_dot_product_attention(query16, keys, values, is_causal=is_causal,
                                             scale=scale, enable_gqa=True)
        return out.to(query.dtype)
    keep = visible(query.shape[0], q_len, kv_len, is_causal, kv_lens, query.device)
    if attn_mask is not None:
        keep = keep & attn_mask
    bias = torch.zeros(keep.shape, device=query.device, dtype=torch.float16)
    bias.masked_fill_(~keep, -math.inf)
    group = q_heads // keys.shape[1]
    per_head = bias.shape[1] > 1
    out = torch.stack([F.scaled_dot_product_attention(
        query16[:, g::group], keys, values, scale=scale,
        attn_mask=bias[:, g::group] if per_head else bias) for g in range(group)], 2)
    out = out.flatten(1, 2).masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return out.to(query.dtype)
