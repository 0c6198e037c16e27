"""Query rows for the packed-cache readers: rotation / sketch of every query, in one launch.

The readers score rows r = token * G + group head of each KV head (GQA group G), so that all
heads of a group share each read of the cache; this kernel reads the queries in place (any
strides and float dtype) and writes those rows already rotated and scaled.
"""

import torch
import triton
import triton.language as tl

from .common import cdiv, dense, next_pow2


@triton.jit
def _query_kernel(x_ptr, x_sb, x_sh, x_ss, x_sd, rot_ptr, out_ptr, HKV, R, scale,
                  G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, N: tl.constexpr,
                  N_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [program_id(0) * BLOCK_R, +BLOCK_R) of KV head program_id(1): out (B, HKV, R, N)
    = scale * x @ rot^T in out's dtype, row r = token * G + group head of x (B, Hq, Lq, D);
    rot (N, D) float32 (fp32 products), in BLOCK x BLOCK tiles."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    x_rows = x_ptr + b * x_sb + (h * G + rows % G)[:, None] * x_sh + (rows // G)[:, None] * x_ss
    for n0 in range(0, N_PAD, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK_R, BLOCK], tl.float32)
        for d0 in range(0, D_PAD, BLOCK):
            d = d0 + tl.arange(0, BLOCK)
            x = tl.load(x_rows + d[None, :] * x_sd, mask=row_ok[:, None] & (d < D)[None, :],
                        other=0.0).to(tl.float32)
            rot_t = tl.load(rot_ptr + n[None, :] * D + d[:, None],
                            mask=(d < D)[:, None] & (n < N)[None, :], other=0.0)
            acc = tl.dot(x, rot_t, acc, input_precision="tf32x3")
        tl.store(out_ptr + (pid_bh * R + rows)[:, None] * N + n[None, :],
                 (acc * scale).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (n < N)[None, :])


def rotated_queries(x: torch.Tensor, rotation: torch.Tensor, kv_heads: int, scale: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """scale * x @ rotation^T as (B, Hkv, Lq * G, N) rows (row = token * G + group head) in
    `dtype`, one launch; x (B, Hq, Lq, D) any float dtype, rotation (N, D) float32."""
    batch, q_heads, q_len, dim = x.shape
    n = rotation.shape[0]
    rows = q_len * (q_heads // kv_heads)
    out = torch.empty(batch, kv_heads, rows, n, device=x.device, dtype=dtype)
    block = 16
    torch.library.wrap_triton(_query_kernel)[(cdiv(rows, block), batch * kv_heads)](
        x, *x.stride(), dense(rotation), out, kv_heads, rows, scale,
        G=q_heads // kv_heads, D=dim, D_PAD=max(16, next_pow2(dim)), N=n,
        N_PAD=max(16, next_pow2(n)), BLOCK_R=block,
        BLOCK=min(64, max(16, next_pow2(min(dim, n)))), num_warps=4)
    return out
