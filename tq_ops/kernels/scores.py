"""Asymmetric scores: unscaled logits of queries against packed keys, in Triton.

A program owns one KV head, BLOCK_M query rows (row = token * G + group head, so the heads
of a GQA group share each key tile) and BLOCK_N keys; it decodes the key tile in registers
and writes `n_k * (<Pi q, c[idx]> + gamma * sqrt(pi/2)/m * <S q, s>)` with fp32 dots.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..packed import PackedKeys

from ..codebook import full_table
from .codes import SIGNS, TABLE, key_logits, plane_layout, prefixed, sign_layout, tile_coords
from .common import cdiv, strided
from .queries import rotated_queries


@triton.jit
def _scores_kernel(
        q_ptr, sq_ptr, out_ptr, o_sb, o_sh, o_sq,
        ki_ptr, ki_sb, ki_sh, ki_ss, kn_ptr, kn_sb, kn_sh, kn_ss,
        ks_ptr, ks_sb, ks_sh, ks_ss, kr_ptr, kr_sb, kr_sh, kr_ss, kc_ptr,
        HKV, Lk, R,
        G: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
        K_W0: tl.constexpr, K_W1: tl.constexpr, K_W2: tl.constexpr, K_NSEG: tl.constexpr,
        K_SEGLEN: tl.constexpr, K_SEG_PAD: tl.constexpr, K_OFF1: tl.constexpr,
        K_OFF2: tl.constexpr, S_NSEG: tl.constexpr, S_SEGLEN: tl.constexpr,
        S_SEG_PAD: tl.constexpr, HAS_QJL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[b, h*G+g, i, keys] for q (B, HKV, R, D) and sq (B, HKV, R, M) float32 rows."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)  # int64: cache offsets can pass 2**31
    h = pid_bh % HKV
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    key_ok = keys < Lk

    qrow = (pid_bh * R + rows)[None, :]
    kcoord, kreal = tile_coords(tl.arange(0, K_SEG_PAD * K_NSEG), K_NSEG, K_SEGLEN)
    q = tl.load(q_ptr + qrow * D + kcoord[:, None], mask=row_ok[None, :] & kreal[:, None],
                other=0.0)
    sq = q
    gamma = tl.zeros([BLOCK_N], tl.float32)
    if HAS_QJL:
        scoord, sreal = tile_coords(tl.arange(0, S_SEG_PAD * S_NSEG), S_NSEG, S_SEGLEN)
        sq = tl.load(sq_ptr + qrow * M + scoord[:, None], mask=row_ok[None, :] & sreal[:, None],
                     other=0.0)
        gamma = tl.load(kr_ptr + b * kr_sb + h * kr_sh + keys * kr_ss, mask=key_ok,
                        other=0.0).to(tl.float32)
    s = key_logits(q, sq, ki_ptr + b * ki_sb + h * ki_sh + keys[:, None] * ki_ss,
                   ks_ptr + b * ks_sb + h * ks_sh + keys[:, None] * ks_ss, key_ok, gamma, kc_ptr,
                   None, K_W0, K_W1, K_W2, K_NSEG, K_SEGLEN, K_SEG_PAD, K_OFF1, K_OFF2,
                   S_NSEG, S_SEGLEN, S_SEG_PAD, HAS_QJL, TABLE, SIGNS, "ieee")
    kn = tl.load(kn_ptr + b * kn_sb + h * kn_sh + keys * kn_ss, mask=key_ok, other=0.0)
    s = s * kn.to(tl.float32)[:, None]  # [BLOCK_N, BLOCK_M]
    dst = out_ptr + b * o_sb + (h * G + rows % G)[None, :] * o_sh + (rows // G)[None, :] * o_sq
    tl.store(dst + keys[:, None], s.to(out_ptr.dtype.element_ty),
             mask=key_ok[:, None] & row_ok[None, :])


def scores(query: Tensor, keys: PackedKeys) -> Tensor:
    """Unscaled logits (B, Hq, Lq, Lk) in the query dtype.

    query (B, Hq, Lq, D) float; keys: indices (B, Hkv, Lk, P) uint8, norms (B, Hkv, Lk, 1);
    Prod keys add signs (B, Hkv, Lk, ceil(M/8)) uint8 and residual_norms (B, Hkv, Lk, 1).
    """
    indices, norms, signs, residual_norms, rotation, centroids, qjl, index_bits = keys
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = indices.shape[1], indices.shape[2]
    centroids = full_table(centroids, index_bits).contiguous()  # the kernel gathers c[idx]
    rows = q_len * (q_heads // kv_heads)
    q_rot = rotated_queries(query, rotation, kv_heads, 1.0, torch.float32)
    has_qjl = qjl is not None
    m = qjl.shape[0] if has_qjl else 1
    if has_qjl:
        sq = rotated_queries(query, qjl, kv_heads, math.sqrt(math.pi / 2) / m, torch.float32)
        ks, kr = strided(signs), strided(residual_norms)
    else:
        sq = q_rot
        ks = kr = (indices, 0, 0, 0)
    out = torch.empty(batch, q_heads, q_len, kv_len, device=query.device, dtype=query.dtype)
    block_m, block_n = 16, 64
    grid = (batch * kv_heads, cdiv(rows, block_m), cdiv(kv_len, block_n))
    torch.library.wrap_triton(_scores_kernel)[grid](
        q_rot, sq, out, out.stride(0), out.stride(1), out.stride(2),
        *strided(indices), *strided(norms), *ks, *kr, centroids,
        kv_heads, kv_len, rows, G=q_heads // kv_heads, D=dim, M=m,
        **prefixed("K_", plane_layout(dim, index_bits)),
        **sign_layout(m if has_qjl else 16), HAS_QJL=has_qjl,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out
