"""Which keys each query sees under `kv_lens` and causal masking (ARCHITECTURE.md, Math).

One definition for the reference and the kernels' torch-level steps, so both hide the same
keys.
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
