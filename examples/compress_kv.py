"""Compress keys and values with the seed-compatible API and score queries against them.

Run: python examples/compress_kv.py   (CPU is fine; uses CUDA if available)
"""

import torch

from tq_ops import TurboQuantCompressorMSE, TurboQuantCompressorV2

device = "cuda" if torch.cuda.is_available() else "cpu"
batch, kv_heads, q_heads, seq, head_dim = 1, 8, 32, 1024, 128
gen = torch.Generator().manual_seed(0)  # its own generator: same numbers every run


def random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=torch.float16)


keys, values = random(batch, kv_heads, seq, head_dim), random(batch, kv_heads, seq, head_dim)
query = random(batch, q_heads, 1, head_dim)

key_comp = TurboQuantCompressorV2(head_dim=head_dim, bits=4)   # 3-bit MSE + 1-bit QJL
val_comp = TurboQuantCompressorMSE(head_dim=head_dim, bits=4)
compressed_k, compressed_v = key_comp.compress(keys), val_comp.compress(values)

scores = key_comp.asymmetric_attention_scores(query, compressed_k)  # (1, 32, 1, 1024)
exact = query.float() @ keys.float().repeat_interleave(q_heads // kv_heads, 1).mT
fp16_bytes = keys.numel() * 2 + values.numel() * 2
packed_bytes = compressed_k.nbytes + compressed_v.nbytes
print(f"K/V cache: {fp16_bytes / 2**20:.2f} MiB fp16 -> {packed_bytes / 2**20:.2f} MiB "
      f"({fp16_bytes / packed_bytes:.2f}x smaller)")
print(f"logit error (relative RMS): {((scores.float() - exact).norm() / exact.norm()).item():.4f}")
print(f"value reconstruction MSE (relative): "
      f"{((val_comp.decompress(compressed_v) - values).float().norm() / values.float().norm()).item() ** 2:.4f}")
