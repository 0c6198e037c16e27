"""Decompress packed vectors (debugging, fallbacks, `flash_prefill`) with a Triton unpack kernel.

The kernel turns packed rows into rotated-domain centroid values `c[idx]` and QJL signs
(+-1), both float32; scaled in place, two matmuls then rotate back and add the QJL term:
`(n c[idx]) @ Pi + (n gamma sqrt(pi/2)/m s) @ S`. Peak memory: about 8 (MSE) or 12 (Prod,
m = d) x d bytes per vector.
"""

import math

import torch
import triton
import triton.language as tl

from .codes import SIGNS, TABLE, decode_tile, plane_layout, prefixed, tile_coords


@triton.jit
def _unpack_kernel(idx_ptr, i_sr, sign_ptr, s_sr, cent_ptr, y_ptr, sgn_ptr, N,
                   D: tl.constexpr, M: tl.constexpr,
                   K_W0: tl.constexpr, K_W1: tl.constexpr, K_W2: tl.constexpr,
                   K_NSEG: tl.constexpr, K_SEGLEN: tl.constexpr, K_SEG_PAD: tl.constexpr,
                   K_OFF1: tl.constexpr, K_OFF2: tl.constexpr,
                   S_W0: tl.constexpr, S_W1: tl.constexpr, S_W2: tl.constexpr,
                   S_NSEG: tl.constexpr, S_SEGLEN: tl.constexpr, S_SEG_PAD: tl.constexpr,
                   S_OFF1: tl.constexpr, S_OFF2: tl.constexpr, HAS_QJL: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Rows [pid * BLOCK_N, +BLOCK_N) of N: y (N, D) = c[idx], sgn (N, M) = +-1, float32."""
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


def decompress(indices, norms, signs, residual_norms, rotation, centroids, qjl, bits, dtype):
    """Packed (B, H, S, .) fields -> reconstruction (B, H, S, D) in `dtype`.

    indices (B, H, S, P) uint8, norms (B, H, S, 1); Prod adds signs (B, H, S, ceil(M/8))
    uint8, residual_norms (B, H, S, 1) and qjl (M, D). rotation (D, D), centroids (2**bits,)
    float32.
    """
    lead = tuple(indices.shape[:3])
    dim = rotation.shape[0]
    count = lead[0] * lead[1] * lead[2]
    flat_idx = indices.reshape(count, indices.shape[3])
    has_qjl = qjl is not None
    m = qjl.shape[0] if has_qjl else 1
    flat_signs = signs.reshape(count, signs.shape[3]) if has_qjl else flat_idx
    y = torch.empty(count, dim, device=indices.device, dtype=torch.float32)
    sgn = torch.empty(count, m if has_qjl else 0, device=indices.device, dtype=torch.float32)
    block = 32
    torch.library.wrap_triton(_unpack_kernel)[(triton.cdiv(count, block),)](
        flat_idx, flat_idx.stride(0), flat_signs, flat_signs.stride(0), centroids, y, sgn, count,
        D=dim, M=m, **prefixed("K_", plane_layout(dim, bits)),
        **prefixed("S_", plane_layout(m if has_qjl else 16, 1)), HAS_QJL=has_qjl,
        BLOCK_N=block, num_warps=4)
    norm = norms.reshape(count, 1).float()
    out = y.mul_(norm) @ rotation  # the norm scales rows before the rotation: no extra temporary
    del y
    if has_qjl:
        gamma = residual_norms.reshape(count, 1).float() * (math.sqrt(math.pi / 2) / m)
        out.addmm_(sgn.mul_(norm * gamma), qjl)
    del sgn
    return out.to(dtype).reshape(lead + (dim,))
