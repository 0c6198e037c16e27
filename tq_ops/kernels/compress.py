"""Triton TurboQuant compress (CUDA tensors only): one pass over x, in tiles of BLOCK_M tokens.

Per vector x (head_dim D, D % 8 == 0): n = ||x||, y = (x / n) @ Pi^T, codes = #{boundaries
< y}, split-plane bit packing (ARCHITECTURE.md); Prod adds gamma = ||r_rot|| and the signs of
S r = r_rot @ (Pi S^T), with r_rot = y - c[codes] the residual in the rotated domain.

Precision: the rotation runs on tensor cores in fp16 with fp32 accumulation, exact to about
2^-22 relative. Pi^T is split into fp16 hi + lo; fp16 x is exact in fp16, so x @ hi + x @ lo
(two dots); bf16 / fp32 input is normalised to u and split too, u_hi @ hi + u_hi @ lo +
u_lo @ hi. The QJL projection splits r_rot and Pi S^T the same way (three dots). Codes and
sign bits so differ from an fp32 reference only at rounding ties. `build_plan` (one small
kernel) builds the split, column-arranged operands, the codebook midpoints and centroids once
per quantizer (plan/run); a compress given no plan builds one first.

Bucketing is exact. For symmetric codebooks (all of tq_ops', given as their upper half: the
launcher knows from the shape) it bisects |y| over the positive
midpoints as uint32 keys, 2 * bits + sign (3 levels at 4 bits, levels 0-3 by selects among
scalars, deeper levels by register gathers, the last one by the sign of a difference) and fixes
the side with the sign; other codebooks are counted. The norm of fp16 input is that of the
rotated row (Pi orthogonal), so x is loaded once, by the dots only. Programs (two per SM) loop
over runs of consecutive tiles and keep the rotation operands in shared memory across them
when D <= 128 (the QJL operands when m <= 128); MSE on fp16 input loads each tile's x into
registers one tile ahead.

Column arrangement: the rotated coordinates are held as an (8, SEG_P) grid, column
i * SEG_P + k <-> coordinate i * SEG + k (SEG = D / 8, SEG_P its next power of two). A plane
of width w packs fine segments i' * w + a into byte a * SEG + k, so every plane is a reshape
and a shifted sum, with no gather; padding columns are masked out, never stored.

Triton 3.6 on Hopper races (wrong codes for some vectors; BENCHMARKS.md, "Compress") when a
loaded block feeds both a wgmma and another use, or when a register operand of an async wgmma
is rewritten in a loop; here every loaded block feeds only dots or only register
math, and each tile's dot results are used before the next tile's operands are written.
Prod reads c[codes] from a register copy of the codebook (tl.gather): a load there, at an
address computed from a dot, feeding another dot, stops the Triton 3.6 pipeliner.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..codebook import full_table
from ..packing import packed_bytes, plane_widths
from .common import (INTERPRET, ROT_SCALE, UNIT_SCALE, cdiv, int_cache, next_pow2,
                     persistent_programs, split_f16)


@triton.jit
def _load_x(ptrs, in_rows, offs_k, cols_left, FULL: tl.constexpr):
    """Load a (BLOCK_M, KB) input block (0 outside); FULL (D a power of two) masks rows
    only, so the loads stay vectorised."""
    if FULL:
        return tl.load(ptrs, mask=in_rows[:, None], other=0.0)
    return tl.load(ptrs, mask=in_rows[:, None] & (offs_k < cols_left)[None, :], other=0.0)


@triton.jit
def _x_tile(x_ptr, stride_xb, stride_xh, stride_xs, stride_xd, b, h, s0, rows, offs_k):
    """Pointers (BLOCK_M, KB) to tokens s0 + rows of head (b, h)."""
    return (x_ptr + (b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
                     + s0.to(tl.int64) * stride_xs)
            + (rows.to(tl.int64) * stride_xs)[:, None] + offs_k[None, :] * stride_xd)


@triton.jit
def _fetch_tile(x_ptr, stride_xb, stride_xh, stride_xs, stride_xd, b, h, s0, rows, offs_k,
                rows_ok, D: tl.constexpr, D_P: tl.constexpr):
    """The whole (BLOCK_M, D_P) input tile of tokens s0 + rows of head (b, h) (0 where not
    rows_ok)."""
    return _load_x(_x_tile(x_ptr, stride_xb, stride_xh, stride_xs, stride_xd, b, h, s0, rows,
                           offs_k), rows_ok, offs_k, D, D == D_P)


@triton.jit
def _tile_rows(rows, s0, b, h, S, H, BH):
    """Which rows of the tile of tokens s0 + rows of head (b, h) exist."""
    return (rows < S - s0) & (b * H + h < BH)


@triton.jit
def _next_tile(s0, h, b, S, H, BLOCK_M: tl.constexpr):
    """(s0, h, b) of the tile after tokens [s0, s0 + BLOCK_M) of head (b, h), no divisions."""
    s0 += BLOCK_M
    h += (s0 >= S).to(tl.int32)
    s0 = tl.where(s0 >= S, 0, s0)
    b += (h == H).to(tl.int32)
    return s0, tl.where(h == H, 0, h), b


@triton.jit
def _keys(tab_ptr, N: tl.constexpr):
    """The bisection keys of a table of N non-negative fp32 entries: a tuple of uint32
    scalars, 2 * the bits of each (the kernel loads them once, before its tile loop; loads
    that nothing uses are dropped)."""
    keys = ()
    for j in tl.static_range(N):
        keys = keys + (tl.load(tab_ptr + j).to(tl.uint32, bitcast=True) << 1,)
    return keys


@triton.jit
def _node(keys, J: tl.constexpr, LEVEL: tl.constexpr, LEVELS: tl.constexpr):
    """The key bisection level LEVEL compares with after code prefix J."""
    return keys[((2 * J + 1) << (LEVELS - 1 - LEVEL)) - 1]


@triton.jit
def _pick4(keys, c_hi, c_lo, J: tl.constexpr, LEVEL: tl.constexpr, LEVELS: tl.constexpr):
    """The node of level LEVEL after prefix J + 2 * c_hi + c_lo, by selects among scalars."""
    return tl.where(c_hi,
                    tl.where(c_lo, _node(keys, J + 3, LEVEL, LEVELS),
                             _node(keys, J + 2, LEVEL, LEVELS)),
                    tl.where(c_lo, _node(keys, J + 1, LEVEL, LEVELS),
                             _node(keys, J, LEVEL, LEVELS)))


@triton.jit
def _count(m, key, t, c, REST: tl.constexpr):
    """m with bit REST set where key > t (the predicate c). The last level (REST 0) adds the
    sign bit of t - key instead (key, t < 2**31), one instruction and no predicate."""
    if REST == 0:
        return m + ((t - key) >> 31).to(tl.int32)
    return tl.where(c, m | (1 << REST), m)


@triton.jit
def _bisect(key, keys, tab_ptr, LEVELS: tl.constexpr):
    """#{j : 2 * bits(tab[j]) < key} (int32) for uint32 keys (BLOCK_M, N) < 2**31 and a
    sorted table of 2**LEVELS - 1 non-negative fp32 entries at tab_ptr, `keys` its `_keys`,
    by bisection: levels 0-3 pick their key with selects among scalars, deeper levels gather
    it from a register copy; m holds the bits decided so far in place."""
    m = tl.zeros(key.shape, tl.int32)
    if LEVELS > 0:
        t0 = _node(keys, 0, 0, LEVELS)
        c0 = key > t0
        m = _count(m, key, t0, c0, LEVELS - 1)
    if LEVELS > 1:
        t1 = tl.where(c0, _node(keys, 1, 1, LEVELS), _node(keys, 0, 1, LEVELS))
        c1 = key > t1
        m = _count(m, key, t1, c1, LEVELS - 2)
    if LEVELS > 2:
        t2 = _pick4(keys, c0, c1, 0, 2, LEVELS)
        c2 = key > t2
        m = _count(m, key, t2, c2, LEVELS - 3)
    if LEVELS > 3:
        t3 = tl.where(c0, _pick4(keys, c1, c2, 4, 3, LEVELS), _pick4(keys, c1, c2, 0, 3, LEVELS))
        m = _count(m, key, t3, key > t3, LEVELS - 4)
    if LEVELS > 4:  # a register copy of the table (a load at a dot-derived address, feeding
        # the QJL dots, stops the pipeliner)
        offs = tl.arange(0, 1 << LEVELS)
        tab = tl.load(tab_ptr + offs, mask=offs < (1 << LEVELS) - 1, other=0.0)
        tab = tl.broadcast_to((tab.to(tl.uint32, bitcast=True) << 1)[None, :],
                              (key.shape[0], 1 << LEVELS))
    for level in tl.static_range(4, LEVELS):
        t = tl.gather(tab, m + ((1 << (LEVELS - 1 - level)) - 1), 1)
        m = _count(m, key, t, key > t, LEVELS - 1 - level)
    return m


@triton.jit
def _bucketize(y, bnd_ptr, BITS: tl.constexpr, SYM: tl.constexpr, keys=None):
    """codes = #{k : boundary_k < y} (int32, shaped like y), exactly; `keys`: the `_keys` of
    the positive boundaries if preloaded (SYM), else they are loaded here.

    SYM (symmetric boundaries, b[n-1-k] == -b[k], so the middle one is 0; every tq_ops
    codebook): bisect |y| over the 2**(BITS-1) - 1 positive ones b+. y > 0 gives
    HALF + #{b+ < y}; y <= 0 gives HALF - 1 - #{b+ <= |y|}. Both compare the uint32 key
    2 * bits(|y|) + sign bit (the bits rotated left by one) with 2 * bits(b+): fp32 bit
    patterns of non-negative floats are ordered like the values, and the sign bit turns > into
    >= for y <= -0 (+0 takes the y <= 0 side with key 0). Needs |y| < 2 (key < 2**31), as for
    the coordinates of a unit vector. Otherwise count the boundaries (slow, small)."""
    HALF: tl.constexpr = 1 << (BITS - 1)
    if SYM:
        yb = y.to(tl.uint32, bitcast=True)
        key = (yb << 1) | (yb >> 31)
        if keys is None:
            keys = _keys(bnd_ptr + HALF, HALF - 1)
        m = _bisect(key, keys, bnd_ptr + HALF, BITS - 1)
        codes = tl.where(y > 0, HALF + m, HALF - 1 - m)
    else:
        codes = tl.zeros(y.shape, tl.int32)
        for k in range(2 * HALF - 1):
            codes += (y > tl.load(bnd_ptr + k)).to(tl.int32)
    return codes


@triton.jit
def _store_plane(codes, row_ptr, stride_p, row_ok, W: tl.constexpr, SHIFT: tl.constexpr,
                 OFFSET: tl.constexpr, SEG: tl.constexpr, SEG_P: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Pack bits [SHIFT, SHIFT + W) of codes (BLOCK_M, 8 * SEG_P) into one plane at OFFSET."""
    PER: tl.constexpr = 8 // W
    part = (codes >> SHIFT) & ((1 << W) - 1)
    part = tl.reshape(part, (BLOCK_M, PER, W * SEG_P))
    lanes = tl.arange(0, PER) * W
    byte = tl.sum(part << lanes[None, :, None], axis=1)
    t = tl.arange(0, W * SEG_P)
    if SEG == SEG_P:  # the plane is one contiguous run of bytes: vector stores
        tl.store(row_ptr[:, None] + (OFFSET + t)[None, :] * stride_p, byte.to(tl.uint8),
                 mask=row_ok[:, None])
    else:
        col = OFFSET + (t // SEG_P) * SEG + t % SEG_P
        tl.store(row_ptr[:, None] + col[None, :] * stride_p, byte.to(tl.uint8),
                 mask=row_ok[:, None] & (t % SEG_P < SEG)[None, :])


@triton.jit
def _plan_kernel(rot_ptr, stride_r0, stride_r1, qjl_ptr, stride_q0, stride_q1, cent_ptr, plan_ptr,
                 D: tl.constexpr, D_P: tl.constexpr, SEG: tl.constexpr, SEG_P: tl.constexpr,
                 M_QJL: tl.constexpr, QSEG: tl.constexpr, QSEG_P: tl.constexpr,
                 QJL_OFF: tl.constexpr, BND_OFF: tl.constexpr, CENT_OFF: tl.constexpr,
                 N: tl.constexpr, HAS_QJL: tl.constexpr, BLOCK_C: tl.constexpr):
    """A `build_plan`, BLOCK_C arranged columns per program: at byte 0, (2, D_P, NCOL) fp16
    hi/lo of ROT_SCALE * Pi^T[:, coord(c)]; at QJL_OFF, (2, NCOL, QCOL) fp16 hi/lo of
    ROT_SCALE * (Pi S^T)[coord(c), row(q)]; program 0 also writes the N - 1 midpoints of the
    N fp32 centroids at cent_ptr (at BND_OFF) and the centroids (at CENT_OFF)."""
    NCOL: tl.constexpr = 8 * SEG_P
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    coord = (offs_c // SEG_P) * SEG + offs_c % SEG_P
    c_ok = offs_c % SEG_P < SEG
    offs_k = tl.arange(0, D_P)
    pi = tl.load(rot_ptr + coord[:, None] * stride_r0 + offs_k[None, :] * stride_r1,
                 mask=c_ok[:, None] & (offs_k[None, :] < D), other=0.0).to(tl.float32)
    hi, lo = split_f16(pi * ROT_SCALE)
    out = plan_ptr.to(tl.pointer_type(tl.float16)) + offs_k[None, :] * NCOL + offs_c[:, None]
    tl.store(out, hi)
    tl.store(out + D_P * NCOL, lo)
    if HAS_QJL:
        QCOL: tl.constexpr = 8 * QSEG_P
        offs_q = tl.arange(0, QCOL)
        row = (offs_q // QSEG_P) * QSEG + offs_q % QSEG_P
        q_ok = (offs_q % QSEG_P < QSEG) & (row < M_QJL)
        acc = tl.zeros((BLOCK_C, QCOL), tl.float32)
        for j in range(D):
            a = tl.load(rot_ptr + coord * stride_r0 + j * stride_r1, mask=c_ok, other=0.0)
            s = tl.load(qjl_ptr + row * stride_q0 + j * stride_q1, mask=q_ok, other=0.0)
            acc += a.to(tl.float32)[:, None] * s.to(tl.float32)[None, :]
        hi, lo = split_f16(acc * ROT_SCALE)
        out = ((plan_ptr + QJL_OFF).to(tl.pointer_type(tl.float16)) + offs_c[:, None] * QCOL
               + offs_q[None, :])
        tl.store(out, hi)
        tl.store(out + NCOL * QCOL, lo)
    if pid == 0:
        N_P: tl.constexpr = max(2, N)
        offs = tl.arange(0, N_P)
        c = tl.load(cent_ptr + offs, mask=offs < N, other=0.0)
        c_next = tl.load(cent_ptr + offs + 1, mask=offs + 1 < N, other=0.0)
        tl.store((plan_ptr + BND_OFF).to(tl.pointer_type(tl.float32)) + offs, (c + c_next) * 0.5,
                 mask=offs + 1 < N)
        tl.store((plan_ptr + CENT_OFF).to(tl.pointer_type(tl.float32)) + offs, c, mask=offs < N)


@triton.jit
def _compress_kernel(
        x_ptr, stride_xb, stride_xh, stride_xs, stride_xd,
        plan_ptr, pos_ptr,
        idx_ptr, stride_ib, stride_ih, stride_is, stride_ip,
        nrm_ptr, stride_nb, stride_nh, stride_ns,
        sgn_ptr, stride_gb, stride_gh, stride_gs, stride_gp,
        res_ptr, stride_rb, stride_rh, stride_rs,
        BH, H, S, S_out,
        D: tl.constexpr, D_P: tl.constexpr, SEG: tl.constexpr, SEG_P: tl.constexpr,
        M_QJL: tl.constexpr, QSEG: tl.constexpr, QSEG_P: tl.constexpr,
        BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
        HAS_QJL: tl.constexpr, HAS_POS: tl.constexpr, X_FP16: tl.constexpr,
        QJL_OFF: tl.constexpr, BND_OFF: tl.constexpr, CENT_OFF: tl.constexpr,
        KB: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SYM: tl.constexpr):
    """Compress x into the outputs, with the operands of a `plan` at plan_ptr (uint8; sections
    at byte offsets 0, QJL_OFF, BND_OFF, CENT_OFF: `_plan_layout`). SYM: the codebook is
    symmetric about 0 (the launcher knows it from the shape of `centroids`).

    The n_tiles = BH * cdiv(S, BLOCK_M) tiles of BLOCK_M tokens are split into equal runs of
    consecutive tiles, one per program; tile t covers tokens [BLOCK_M * (t % cdiv(S, BLOCK_M)),
    + BLOCK_M) of head t // cdiv(S, BLOCK_M) (= b * H + h). A program steps (b, h, s0) from
    tile to tile (no divisions in the loop); x rows are addressed from the tile's first row.

    The rotation runs in KB-row chunks of its operands (KB = D_P when D_P <= 128: then the
    operand loads are loop-invariant and stay in shared memory for all the program's tiles), the QJL
    projection in QBLOCK-column chunks likewise. With HAS_POS, token s goes to slot pos[s] of
    the (B, H, S_out, .) outputs; rows whose slot is outside [0, S_out) are not written.
    """
    rot_ptr = plan_ptr.to(tl.pointer_type(tl.float16))
    qjl_ptr = (plan_ptr + QJL_OFF).to(tl.pointer_type(tl.float16))
    bnd_ptr = (plan_ptr + BND_OFF).to(tl.pointer_type(tl.float32))
    cent_ptr = (plan_ptr + CENT_OFF).to(tl.pointer_type(tl.float32))
    NCOL: tl.constexpr = 8 * SEG_P
    QCOL: tl.constexpr = 8 * QSEG_P
    tiles_s = tl.cdiv(S, BLOCK_M)
    per_program = tl.cdiv(BH * tiles_s, tl.num_programs(0))
    offs_k = tl.arange(0, KB)
    offs_c = tl.arange(0, NCOL)
    col_ok = (offs_c % SEG_P < SEG)[None, :]
    rot = rot_ptr + offs_k[:, None] * NCOL + offs_c[None, :]
    if KB == D_P:  # the rotation operands fit in shared memory: load them once
        rot_hi = tl.load(rot)
        rot_lo = tl.load(rot + D_P * NCOL)
    proj = qjl_ptr + offs_c[:, None] * QCOL + tl.arange(0, QBLOCK)[None, :]
    if HAS_QJL and QBLOCK == QCOL:  # so do the projection operands
        proj_hi = tl.load(proj)
        proj_lo = tl.load(proj + NCOL * QCOL)
    if HAS_QJL and BITS > 0:
        centroids = tl.load(cent_ptr + tl.arange(0, 1 << BITS))
    keys = None  # the bisection keys of the positive midpoints (symmetric codebooks)
    if SYM and BITS > 0:
        keys = _keys(bnd_ptr + (1 << (BITS - 1)), (1 << (BITS - 1)) - 1)
    first = tl.program_id(0) * per_program  # the run's first tile: tokens s0.. of head (b, h)
    s0 = first % tiles_s * BLOCK_M
    b = first // tiles_s // H
    h = first // tiles_s % H
    rows = tl.arange(0, BLOCK_M)
    # MSE of fp16 rows in one chunk: the next tile's x is loaded into registers at the top of
    # the loop, so its latency overlaps this tile's dots and bucketing (the pipeliner issues it
    # at the end of the body, where it stalled the next tile; ncu, BENCHMARKS.md). Prod would
    # spill.
    PREFETCH: tl.constexpr = X_FP16 and KB == D_P and not HAS_QJL
    if PREFETCH:
        x_next = _fetch_tile(x_ptr, stride_xb, stride_xh, stride_xs, stride_xd, b, h, s0, rows,
                             offs_k, _tile_rows(rows, s0, b, h, S, H, BH), D, D_P)
    for t in range(per_program):
        in_rows = _tile_rows(rows, s0, b, h, S, H, BH)
        s0_n, h_n, b_n = _next_tile(s0, h, b, S, H, BLOCK_M)
        if PREFETCH:
            xk = x_next
            x_next = _fetch_tile(x_ptr, stride_xb, stride_xh, stride_xs, stride_xd, b_n, h_n,
                                 s0_n, rows, offs_k,
                                 _tile_rows(rows, s0_n, b_n, h_n, S, H, BH) & (t + 1 < per_program),
                                 D, D_P)
        s = s0 + rows
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        if HAS_POS:
            slot = tl.load(pos_ptr + s, mask=in_rows, other=-1).to(tl.int64)
            row_ok = in_rows & (slot >= 0) & (slot < S_out)
        else:
            slot = s.to(tl.int64)
            row_ok = in_rows
        x_ptrs = _x_tile(x_ptr, stride_xb, stride_xh, stride_xs, stride_xd, b, h, s0, rows,
                         offs_k)
        # Every loaded block feeds only dots, or only register math (a block feeding a wgmma and
        # another use, or a register operand rewritten while an async wgmma reads it, races).
        acc = tl.zeros((BLOCK_M, NCOL), tl.float32)
        if X_FP16:  # x is exact in fp16: x @ hi + x @ lo; the norm is that of the rotated row
            for kx in range(0, D_P, KB):  # one iteration when KB == D_P
                if KB < D_P:
                    rot_hi = tl.load(rot + kx * NCOL)
                    rot_lo = tl.load(rot + (D_P + kx) * NCOL)
                if not PREFETCH:
                    xk = _load_x(x_ptrs + kx * stride_xd, in_rows, offs_k, D - kx, D == D_P)
                acc = tl.dot(xk, rot_hi, acc)
                acc = tl.dot(xk, rot_lo, acc)
            scaled = tl.sqrt(tl.sum(acc * acc, axis=1))  # ROT_SCALE * ||x|| (Pi orthogonal)
            norm = scaled * (1.0 / ROT_SCALE)
            y = acc * tl.where(scaled > 0, 1.0 / tl.where(scaled > 0, scaled, 1.0), 0.0)[:, None]
        else:  # u = x / n split into fp16 hi + lo: u_hi @ hi + u_hi @ lo + u_lo @ hi
            peak = tl.zeros((BLOCK_M,), tl.float32)  # max |x|: squares of x / peak cannot
            sumsq = tl.zeros((BLOCK_M,), tl.float32)  # underflow or overflow
            for kx in range(0, D_P, KB):  # one iteration when KB == D_P
                xf = _load_x(x_ptrs + kx * stride_xd, in_rows, offs_k, D - kx, D == D_P)
                new_peak = tl.maximum(peak, tl.max(tl.abs(xf.to(tl.float32)), axis=1))
                div = tl.where(new_peak > 0, new_peak, 1.0)
                xs = xf.to(tl.float32) / div[:, None]
                sumsq = sumsq * (peak / div) * (peak / div) + tl.sum(xs * xs, axis=1)
                peak = new_peak
            length = tl.sqrt(sumsq)
            norm = peak * length
            div = tl.where(peak > 0, peak, 1.0)  # u = (x / peak) / length; 0 where x = 0
            scale = UNIT_SCALE / tl.where(length > 0, length, 1.0)
            for kx in range(0, D_P, KB):  # one iteration when KB == D_P
                if KB < D_P:
                    rot_hi = tl.load(rot + kx * NCOL)
                    rot_lo = tl.load(rot + (D_P + kx) * NCOL)
                xf = _load_x(x_ptrs + kx * stride_xd, in_rows, offs_k, D - kx, D == D_P)
                u_hi, u_lo = split_f16(xf.to(tl.float32) / div[:, None] * scale[:, None])
                acc = tl.dot(u_hi, rot_hi, acc)
                acc = tl.dot(u_hi, rot_lo, acc)
                acc = tl.dot(u_lo, rot_hi, acc)
            y = acc * (1.0 / (ROT_SCALE * UNIT_SCALE))
        tl.store(nrm_ptr + b64 * stride_nb + h64 * stride_nh + slot * stride_ns, norm,
                 mask=row_ok)

        if BITS > 0:
            codes = _bucketize(y, bnd_ptr, BITS, SYM, keys)
            idx_row = idx_ptr + b64 * stride_ib + h64 * stride_ih + slot * stride_is
            _store_plane(codes, idx_row, stride_ip, row_ok, W0, BITS - W0, 0, SEG, SEG_P,
                         BLOCK_M)
            if W1 > 0:
                _store_plane(codes, idx_row, stride_ip, row_ok, W1, BITS - W0 - W1, W0 * SEG,
                             SEG, SEG_P, BLOCK_M)
            if W2 > 0:
                _store_plane(codes, idx_row, stride_ip, row_ok, W2, BITS - W0 - W1 - W2,
                             (W0 + W1) * SEG, SEG, SEG_P, BLOCK_M)

        if HAS_QJL:
            if BITS > 0:  # c[codes] from registers: a load here would stall the pipeliner
                cent = tl.broadcast_to(centroids[None, :], (BLOCK_M, 1 << BITS))
                resid = tl.where(col_ok, y - tl.gather(cent, codes, 1), 0.0)
            else:
                resid = y
            gamma = tl.sqrt(tl.sum(resid * resid, axis=1))
            tl.store(res_ptr + b64 * stride_rb + h64 * stride_rh + slot * stride_rs, gamma,
                     mask=row_ok)
            r_hi, r_lo = split_f16(resid * UNIT_SCALE)
            LANES: tl.constexpr = QBLOCK // QSEG_P  # sign bit lanes per chunk of columns
            offs_q = tl.arange(0, QBLOCK)
            lane = offs_q // QSEG_P
            k_q = offs_q % QSEG_P
            packed = tl.zeros((BLOCK_M, QSEG_P), tl.int32)
            for q0 in tl.static_range(0, QCOL, QBLOCK):
                if QBLOCK < QCOL:
                    proj_hi = tl.load(proj + q0)
                    proj_lo = tl.load(proj + NCOL * QCOL + q0)
                z = tl.dot(r_lo, proj_hi)  # r_lo first: the fp32 residual is dead before
                z = tl.dot(r_hi, proj_hi, z)  # the dots start (fewer live registers)
                z = tl.dot(r_hi, proj_lo, z)
                bit_lane = q0 // QSEG_P + lane
                q_ok = (k_q < QSEG) & (bit_lane * QSEG + k_q < M_QJL)
                bit = ((z >= 0) & q_ok[None, :]).to(tl.int32) << bit_lane[None, :]
                packed += tl.sum(tl.reshape(bit, (BLOCK_M, LANES, QSEG_P)), axis=1)
            k_out = tl.arange(0, QSEG_P)
            sgn_row = sgn_ptr + b64 * stride_gb + h64 * stride_gh + slot * stride_gs
            tl.store(sgn_row[:, None] + k_out[None, :] * stride_gp, packed.to(tl.uint8),
                     mask=row_ok[:, None] & (k_out < QSEG)[None, :])
        s0, h, b = s0_n, h_n, b_n


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=st)
            for m, w, st in ((64, 4, 2), (64, 4, 3), (128, 8, 2))]


_compress_tuned = triton.autotune(
    configs=_configs(), key=["D", "M_QJL", "BITS", "HAS_QJL", "X_FP16", "SYM"])(_compress_kernel)


@int_cache
def _plan_layout(dim: int, index_bits: int, qjl_dim: int | None) -> dict:
    """(Cached: copy before changing it.) Sizes of the compress operands of one quantizer: the column grids, and the byte offsets of
    the `plan` sections (each 16-byte aligned) and its total size in bytes."""
    seg = dim // 8
    seg_p = next_pow2(seg)
    dim_p, ncol = next_pow2(dim), 8 * seg_p
    m_qjl = qjl_dim or 0
    qseg = -(-m_qjl // 8)
    qseg_p = max(2, next_pow2(qseg))
    qcol = 8 * qseg_p
    align = lambda n: -(-n // 16) * 16  # noqa: E731
    qjl_off = align(2 * dim_p * ncol * 2)
    bnd_off = qjl_off + (align(2 * ncol * qcol * 2) if qjl_dim else 0)
    cent_off = bnd_off + align(4 * max(1, (1 << index_bits) - 1))
    return dict(D=dim, D_P=dim_p, SEG=seg, SEG_P=seg_p, M_QJL=m_qjl, QSEG=qseg, QSEG_P=qseg_p,
                QJL_OFF=qjl_off, BND_OFF=bnd_off, CENT_OFF=cent_off,
                nbytes=cent_off + 4 * (1 << index_bits))


def plan_bytes(dim: int, index_bits: int, qjl_dim: int | None) -> int:
    """Size in bytes of the `plan` of one quantizer."""
    return _plan_layout(dim, index_bits, qjl_dim)["nbytes"]


def build_plan(rotation: Tensor, centroids: Tensor, qjl: Tensor | None, index_bits: int) -> Tensor:
    """What the compress kernel reads besides x, from one quantizer's constants (op arguments,
    validated by the caller): uint8 (plan_bytes,) holding the fp16 hi/lo tensor-core operands
    of Pi^T and Pi S^T in the kernel's column arrangement, then the codebook midpoints and all
    2**index_bits centroids, fp32. Built once per quantizer and device, it makes each compress
    one launch (plan/run)."""
    dim = rotation.shape[0]
    layout = dict(_plan_layout(dim, index_bits, None if qjl is None else qjl.shape[0]))
    out = torch.empty(layout.pop("nbytes"), dtype=torch.uint8, device=rotation.device)
    proj = qjl if qjl is not None else rotation
    ncol = 8 * layout["SEG_P"]
    block_c = min(16, ncol)
    torch.library.wrap_triton(_plan_kernel)[(ncol // block_c,)](
        rotation, rotation.stride(0), rotation.stride(1), proj, proj.stride(0), proj.stride(1),
        full_table(centroids, index_bits).contiguous(), out, **layout, N=1 << index_bits,
        HAS_QJL=qjl is not None, BLOCK_C=block_c)
    return out


def _launch(x: Tensor, rotation: Tensor, centroids: Tensor, qjl: Tensor | None, index_bits: int,
            plan: Tensor | None, positions: Tensor | None, indices: Tensor, norms: Tensor,
            signs: Tensor | None, residual_norms: Tensor | None) -> None:
    """Compress x (B, H, S, D) into the (B, H, S_out, .) outputs, reading `plan` (a `build_plan`
    of these constants; built here when None)."""
    batch, heads, seq, dim = x.shape
    if batch * heads * seq == 0:
        return
    if dim % 8 or dim < 16:
        raise NotImplementedError(f"the Triton compress kernel needs head_dim % 8 == 0 and >= 16, "
                                  f"got {dim}")
    if plan is None:
        plan = build_plan(rotation, centroids, qjl, index_bits)
    layout = dict(_plan_layout(dim, index_bits, None if qjl is None else qjl.shape[0]))
    layout.pop("nbytes")
    dim_p, qcol = layout["D_P"], 8 * layout["QSEG_P"]
    widths = plane_widths(index_bits) + (0, 0, 0)
    sgn = signs if signs is not None else indices
    res = residual_norms if residual_norms is not None else norms
    programs = persistent_programs(x.device)
    tiles = lambda meta: batch * heads * cdiv(seq, meta["BLOCK_M"])  # noqa: E731
    grid = lambda meta: (min(programs, tiles(meta)),)  # noqa: E731
    torch.library.wrap_triton(_compress_tuned)[grid](
        x, *x.stride(), plan, positions if positions is not None else plan,
        indices, *indices.stride(), norms, *norms.stride()[:3], sgn, *sgn.stride(),
        res, *res.stride()[:3],
        batch * heads, heads, seq, indices.shape[2], **layout,
        BITS=index_bits, W0=widths[0], W1=widths[1], W2=widths[2], HAS_QJL=qjl is not None,
        HAS_POS=positions is not None, X_FP16=x.dtype == torch.float16,
        KB=dim_p if dim_p <= 128 else 64,
        QBLOCK=qcol if qcol <= 128 else max(layout["QSEG_P"], 64),
        SYM=index_bits > 0 and centroids.shape[0] != 1 << index_bits)


def compress(x: Tensor, rotation: Tensor, centroids: Tensor, qjl: Tensor | None, index_bits: int,
             norm_dtype: torch.dtype, plan: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, H, S, D) fp16/bf16/fp32 -> (indices uint8 (B, H, S, packed_bytes(D, index_bits)),
    norms (B, H, S, 1) norm_dtype, signs uint8 (B, H, S, ceil(M / 8)) or (B, H, S, 0),
    residual_norms (B, H, S, 1) or (B, H, S, 0) norm_dtype). rotation (D, D), centroids
    (2**index_bits,), qjl (M, D) or None: float32. Arguments are validated by `tq::compress`."""
    batch, heads, seq, dim = x.shape
    lead = (batch, heads, seq)
    indices = x.new_empty(lead + (packed_bytes(dim, index_bits),), dtype=torch.uint8)
    norms = x.new_empty(lead + (1,), dtype=norm_dtype)
    if qjl is None:
        signs = x.new_empty(lead + (0,), dtype=torch.uint8)
        residual_norms = x.new_empty(lead + (0,), dtype=norm_dtype)
    else:
        signs = x.new_empty(lead + (packed_bytes(qjl.shape[0], 1),), dtype=torch.uint8)
        residual_norms = x.new_empty(lead + (1,), dtype=norm_dtype)
    _launch(x, rotation, centroids, qjl, index_bits, plan, None, indices, norms,
            signs if qjl is not None else None, residual_norms if qjl is not None else None)
    return indices, norms, signs, residual_norms


def compress_into(x: Tensor, rotation: Tensor, centroids: Tensor, qjl: Tensor | None,
                  index_bits: int, positions: Tensor, indices: Tensor, norms: Tensor,
                  signs: Tensor | None, residual_norms: Tensor | None,
                  plan: Tensor | None = None) -> None:
    """Compress x (B, H, S, D) and write token s to slot positions[s] (int32/int64 (S,)) of the
    preallocated (B, H, S_max, .) buffers; slots outside [0, S_max) are never written."""
    _launch(x, rotation, centroids, qjl, index_bits, plan, positions, indices, norms, signs,
            residual_norms)
