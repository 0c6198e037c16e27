"""Decompress packed vectors (debugging, fallbacks, `flash_prefill`, the eager cache) in one
Triton kernel: unpack, rotate back, add the QJL term, scale and write `dtype`, so nothing but
the output touches memory.

Per row: out = n * (c[idx] @ Pi + gamma * sqrt(pi/2) / m * s @ S). The rotations run on tensor
cores with fp32 accumulation, exact to about 2^-22 relative like compress: c[idx] (scaled by
UNIT_SCALE) and Pi, S (scaled by ROT_SCALE) are split into fp16 hi + lo, c_hi @ Pi_hi + c_hi @
Pi_lo + c_lo @ Pi_hi; the signs +-1 are exact in fp16, s @ S_hi + s @ S_lo. The rows of Pi and
S are read in the tile column order of `decode_tile`, so the decoded codes are never shuffled.
Rows of more than 128 code or sign columns (head_dim 256) would spill registers and overflow
shared memory there; they take two steps instead (`_unpack_and_rotate`: an unpack kernel, then
fp32 matmuls).
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..codebook import full_table
from ..packed import PackedKeys
from .codes import SIGNS, TABLE, decode_tile, plane_layout, prefixed, sign_layout, tile_coords
from .common import ROT_SCALE, UNIT_SCALE, cdiv, next_pow2, persistent_programs, split_f16


@triton.jit
def _split_rows(mat_ptr, NSEG: tl.constexpr, SEGLEN: tl.constexpr, SEG_PAD: tl.constexpr,
                cols, D: tl.constexpr):
    """fp16 hi/lo of ROT_SCALE * mat[coord(c), cols] for the tile columns c of `tile_coords`
    (mat (., D) fp32, row-major; 0 in padded rows and columns)."""
    coord, real = tile_coords(tl.arange(0, SEG_PAD * NSEG), NSEG, SEGLEN)
    rows = tl.load(mat_ptr + coord[:, None] * D + cols[None, :],
                   mask=real[:, None] & (cols < D)[None, :], other=0.0)
    return split_f16(rows * ROT_SCALE)


@triton.jit
def _decompress_kernel(idx_ptr, i_sr, sign_ptr, s_sr, nrm_ptr, res_ptr, cent_ptr, rot_ptr,
                       qjl_ptr, out_ptr, N, QJL_SCALE, D: tl.constexpr,
                       K_W0: tl.constexpr, K_W1: tl.constexpr, K_W2: tl.constexpr,
                       K_NSEG: tl.constexpr, K_SEGLEN: tl.constexpr, K_SEG_PAD: tl.constexpr,
                       K_OFF1: tl.constexpr, K_OFF2: tl.constexpr,
                       S_NSEG: tl.constexpr, S_SEGLEN: tl.constexpr, S_SEG_PAD: tl.constexpr,
                       HAS_QJL: tl.constexpr, BLOCK_N: tl.constexpr, OUT_BLOCK: tl.constexpr):
    """Output columns [program_id(1) * OUT_BLOCK, +OUT_BLOCK) of row tiles program_id(0),
    + num_programs(0), ... (BLOCK_N rows each) of N. idx (N, .) / sign (N, .) uint8 with row
    strides i_sr / s_sr; nrm, res (N,) norms and residual norms; cent (2**bits,), rot (D, D),
    qjl (M, D) fp32; out (N, D) contiguous. QJL_SCALE = sqrt(pi/2) / M. The rotation (and
    QJL) operands are loaded once per program and stay in shared memory."""
    cols = tl.program_id(1) * OUT_BLOCK + tl.arange(0, OUT_BLOCK)
    rot_hi, rot_lo = _split_rows(rot_ptr, K_NSEG, K_SEGLEN, K_SEG_PAD, cols, D)
    if HAS_QJL:
        qjl_hi, qjl_lo = _split_rows(qjl_ptr, S_NSEG, S_SEGLEN, S_SEG_PAD, cols, D)
    for t in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        cent = decode_tile(idx_ptr + rows64[:, None] * i_sr, row_ok, cent_ptr, None, K_W0, K_W1,
                           K_W2, K_NSEG, K_SEGLEN, K_SEG_PAD, K_OFF1, K_OFF2, TABLE)
        c_hi, c_lo = split_f16(cent * UNIT_SCALE)
        acc = tl.dot(c_hi, rot_hi)
        acc = tl.dot(c_hi, rot_lo, acc)
        acc = tl.dot(c_lo, rot_hi, acc)
        norm = tl.load(nrm_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
        out = acc * (norm * (1.0 / (ROT_SCALE * UNIT_SCALE)))[:, None]
        if HAS_QJL:
            signs = decode_tile(sign_ptr + rows64[:, None] * s_sr, row_ok, cent_ptr, None, 1, 0,
                                0, S_NSEG, S_SEGLEN, S_SEG_PAD, 0, 0, SIGNS).to(tl.float16)
            proj = tl.dot(signs, qjl_hi)
            proj = tl.dot(signs, qjl_lo, proj)
            gamma = tl.load(res_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
            out += proj * (norm * gamma * (QJL_SCALE / ROT_SCALE))[:, None]
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _unpack_kernel(idx_ptr, i_sr, sign_ptr, s_sr, cent_ptr, y_ptr, sgn_ptr, N,
                   D: tl.constexpr, M: tl.constexpr,
                   K_W0: tl.constexpr, K_W1: tl.constexpr, K_W2: tl.constexpr,
                   K_NSEG: tl.constexpr, K_SEGLEN: tl.constexpr, K_SEG_PAD: tl.constexpr,
                   K_OFF1: tl.constexpr, K_OFF2: tl.constexpr,
                   S_NSEG: tl.constexpr, S_SEGLEN: tl.constexpr, S_SEG_PAD: tl.constexpr,
                   HAS_QJL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [pid * BLOCK_N, +BLOCK_N) of N: y (N, D) = c[idx], sgn (N, M) = +-1, float32
    (rows wider than `_decompress_kernel` takes)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows[:, None].to(tl.int64)
    y = decode_tile(idx_ptr + rows64 * i_sr, row_ok, cent_ptr, None, K_W0, K_W1, K_W2, K_NSEG,
                    K_SEGLEN, K_SEG_PAD, K_OFF1, K_OFF2, TABLE)
    coord, real = tile_coords(tl.arange(0, K_SEG_PAD * K_NSEG), K_NSEG, K_SEGLEN)
    tl.store(y_ptr + rows64 * D + coord[None, :], y, mask=row_ok[:, None] & real[None, :])
    if HAS_QJL:
        signs = decode_tile(sign_ptr + rows64 * s_sr, row_ok, cent_ptr, None, 1, 0, 0, S_NSEG,
                            S_SEGLEN, S_SEG_PAD, 0, 0, SIGNS)
        scoord, sreal = tile_coords(tl.arange(0, S_SEG_PAD * S_NSEG), S_NSEG, S_SEGLEN)
        tl.store(sgn_ptr + rows64 * M + scoord[None, :], signs,
                 mask=row_ok[:, None] & sreal[None, :])


def _unpack_and_rotate(flat_idx, flat_signs, norms, residual_norms, rotation, centroids, qjl,
                       k_layout, s_layout, out):
    """Rows wider than 128 code (or sign) columns: `_unpack_kernel` writes c[idx] and the
    signs in fp32, then fp32 matmuls rotate back (peak memory about 8 (MSE) or 12 (Prod,
    m = d) x d bytes per vector)."""
    count, dim = flat_idx.shape[0], rotation.shape[0]
    m = qjl.shape[0] if qjl is not None else 0
    y = torch.empty(count, dim, device=out.device, dtype=torch.float32)
    sgn = torch.empty(count, m, device=out.device, dtype=torch.float32)
    block = 32
    torch.library.wrap_triton(_unpack_kernel)[(cdiv(count, block),)](
        flat_idx, flat_idx.stride(0), flat_signs, flat_signs.stride(0), centroids, y, sgn, count,
        D=dim, M=max(m, 1), **prefixed("K_", k_layout), **s_layout, HAS_QJL=qjl is not None,
        BLOCK_N=block, num_warps=4)
    norm = norms.reshape(count, 1).float()
    unit = y.mul_(norm) @ rotation  # the norm scales rows before the rotation
    del y
    if qjl is not None:
        gamma = residual_norms.reshape(count, 1).float() * (math.sqrt(math.pi / 2) / m)
        unit.addmm_(sgn.mul_(norm * gamma), qjl)
    out.copy_(unit.view(out.shape))
    return out


def decompress(keys: PackedKeys, dtype: torch.dtype) -> Tensor:
    """Packed (B, H, S, .) fields -> reconstruction (B, H, S, D) in `dtype`.

    keys: indices (B, H, S, P) uint8, norms (B, H, S, 1); Prod adds signs (B, H, S, ceil(M/8))
    uint8, residual_norms (B, H, S, 1) and qjl (M, D). rotation (D, D) float32, centroids
    float32 (2**index_bits,) or a symmetric table's upper half.
    """
    indices, norms, signs, residual_norms, rotation, centroids, qjl, index_bits = keys
    lead = tuple(indices.shape[:3])
    dim = rotation.shape[0]
    centroids = full_table(centroids, index_bits).contiguous()  # the kernel gathers c[idx]
    count = lead[0] * lead[1] * lead[2]
    out = torch.empty(lead + (dim,), device=indices.device, dtype=dtype)
    if count == 0:
        return out
    flat_idx = indices.reshape(count, indices.shape[3])
    has_qjl = qjl is not None
    m = qjl.shape[0] if has_qjl else 16
    flat_signs = signs.reshape(count, signs.shape[3]) if has_qjl else flat_idx
    res = residual_norms if has_qjl else norms
    k_layout = plane_layout(dim, index_bits)
    s_layout = sign_layout(m)
    k_cols = k_layout["SEG_PAD"] * k_layout["NSEG"]
    if max(k_cols, s_layout["S_SEG_PAD"] * s_layout["S_NSEG"]) > 128:
        return _unpack_and_rotate(flat_idx, flat_signs, norms, residual_norms, rotation,
                                  centroids, qjl, k_layout, s_layout, out)
    # 64-row tiles keep the dots on wgmma (its B operand stays in shared memory); output
    # blocks of 128 (MSE) or 64 (Prod) columns fit 136-160 KB of shared memory and 255
    # registers without spills at head_dim 128 (bench/sass_stats.py-style offline builds).
    block_n, out_block = 64, min(next_pow2(dim), 64 if has_qjl else 128)
    col_blocks = cdiv(dim, out_block)
    grid = (min(cdiv(count, block_n),
                max(1, persistent_programs(indices.device) // col_blocks)), col_blocks)
    torch.library.wrap_triton(_decompress_kernel)[grid](
        flat_idx, flat_idx.stride(0), flat_signs, flat_signs.stride(0),
        norms.reshape(count), res.reshape(count), centroids.contiguous(),
        rotation.contiguous(), (qjl if has_qjl else rotation).contiguous(), out, count,
        math.sqrt(math.pi / 2) / m, D=dim, **prefixed("K_", k_layout), **s_layout,
        HAS_QJL=has_qjl, BLOCK_N=block_n, OUT_BLOCK=out_block, num_warps=4)
    return out
