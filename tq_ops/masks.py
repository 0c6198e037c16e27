"""Which keys each query sees under `kv_lens` and causal masking (ARCHITECTURE.md, Math).

One definition for the reference and the kernels' torch-level steps, so both hide the same
keys.
"""

import torch
from torch import Tensor


def visible(batch: int, q_len: int, kv_len: int, is_causal: bool, kv_lens: Tensor | None,
            device: torch.device) -> Tensor:
    """Bool (B, 1, Lq, Lk): key j visible to query i (kv_lens and bottom-right causal)."""
    key = torch.arange(kv_len, device=device)
    lengths = (torch.full((batch,), kv_len, device=device) if kv_lens is None
               else kv_lens.to(device=device, dtype=torch.long))
    keep = key[None, None, :] < lengths[:, None, None]  # (B, 1, Lk)
    if is_causal:
        last = lengths[:, None] - q_len + torch.arange(q_len, device=device)  # (B, Lq)
        keep = keep & (key[None, None, :] <= last[:, :, None])
    return keep.expand(batch, q_len, kv_len).unsqueeze(1)
