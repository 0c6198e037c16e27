"""Which keys each query sees under `kv_lens` and causal masking (ARCHITECTURE.md, Math), and
which it reads in full precision (`ExactTokens`).

One definition for the reference and the kernels' torch-level steps, so both hide (and read
exact) the same keys.
"""

import torch
from torch import Tensor


def lengths(batch: int, kv_len: int, kv_lens: Tensor | None, device: torch.device) -> Tensor:
    """Keys per batch row, int64 (B,): kv_lens, or kv_len for every row."""
    if kv_lens is None:
        return torch.full((batch,), kv_len, device=device)
    return kv_lens.to(device=device, dtype=torch.long)


def visible_keys(lengths: Tensor, q_len: int, keys: Tensor, is_causal: bool) -> Tensor:
    """Bool (B, Lq, K): key position keys[j] visible to query i of batch row b (below
    lengths[b] and, if causal, at most lengths[b] - Lq + i: bottom-right aligned)."""
    keep = keys[None, None, :] < lengths[:, None, None]
    if is_causal:
        last = lengths[:, None] - q_len + torch.arange(q_len, device=keys.device)  # (B, Lq)
        keep = keep & (keys[None, None, :] <= last[:, :, None])
    return keep.expand(lengths.shape[0], q_len, keys.shape[0])


def visible(batch: int, q_len: int, kv_len: int, is_causal: bool, kv_lens: Tensor | None,
            device: torch.device) -> Tensor:
    """Bool (B, 1, Lq, Lk): key j visible to query i (kv_lens and bottom-right causal)."""
    rows = lengths(batch, kv_len, kv_lens, device)
    return visible_keys(rows, q_len, torch.arange(kv_len, device=device), is_causal).unsqueeze(1)


def exact_keys(lengths: Tensor, start: Tensor, sinks: int, keys: Tensor) -> Tensor:
    """Bool (B, K): key position keys[j] of batch row b read in full precision (`ExactTokens`):
    below `sinks`, or in [start[b], lengths[b])."""
    keys = keys[None, :]
    return (keys < sinks) | ((keys >= start[:, None]) & (keys < lengths[:, None]))


def exact_slots(keys: Tensor, sinks: int, ring: int) -> Tensor:
    """Slot of each key position in an `ExactTokens` buffer: j below `sinks`, else
    sinks + (j - sinks) % ring (any slot for a position that is not exact)."""
    if ring == 0:
        return keys.clamp(max=max(sinks - 1, 0))
    return torch.where(keys < sinks, keys, sinks + torch.remainder(keys - sinks, ring))


def overlay_exact(decoded: Tensor, buffer: Tensor, lengths: Tensor, start: Tensor, sinks: int,
                  keys: Tensor) -> Tensor:
    """decoded (B, H, K, D) of key positions `keys` (K,) with the exact ones replaced by their
    `ExactTokens` slots of buffer (B, H, sinks + ring, D), in decoded's dtype."""
    ring = buffer.shape[2] - sinks
    exact = exact_keys(lengths, start, sinks, keys)[:, None, :, None]
    slots = exact_slots(keys, sinks, ring)
    return torch.where(exact, buffer.index_select(2, slots).to(decoded.dtype), decoded)
