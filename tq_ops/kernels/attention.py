"""Fused attention from the compressed K/V cache: the attention kernel, the split merge,
their launch configuration (`config`) and launcher (`fused_attention`).

The fused kernel serves decode and any masked, ragged or chunked call (`ops.attention` picks
it or prefill by decompression, `prefill.py`). A program owns one KV head, a tile of BLOCK_M
query rows and one split of the key range. The rows of a KV head are its (query token, group
head) pairs, token-major (row = i * G + g), so every head of a GQA group shares one read and
one decode of each K/V tile. Per K/V tile the kernel unpacks the codes in registers, scores
keys as `n_k * (<Pi_k q, c[idx]> + gamma * <S q, s>)` with tensor-core dots, runs an fp32
online softmax (base 2) and accumulates `p * n_v` against the value centroids in the rotated
domain. Decode splits the key range (flash-decoding) and a second kernel merges the splits; the
launcher rotates queries before and outputs (`@ Pi_v`) after, once per row. The fused kernel
never writes decompressed K or V to memory.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..packed import ExactTokens, PackedKeys, PackedValues

from ..codebook import full_table
from .codes import (PAIRS, PLANES3, SIGN_BITS, SIGNS, TABLE, decode_tile, key_logits,
                    nibble_halves, plane_layout, prefixed, qjl_logits, segments, sign_layout,
                    tile_coords)
from .common import INTERPRET, cdiv, dense, next_pow2, num_sms, strided
from .ptx import table_words
from .queries import rotated_queries

LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
        q_ptr, sq_ptr, o_ptr, o_sb, o_sh, o_ss, ml_ptr,
        ki_ptr, ki_sb, ki_sh, ki_ss, kn_ptr, kn_sb, kn_sh, kn_ss,
        ks_ptr, ks_sb, ks_sh, ks_ss, kr_ptr, kr_sb, kr_sh, kr_ss, kc_ptr,
        vi_ptr, vi_sb, vi_sh, vi_ss, vn_ptr, vn_sb, vn_sh, vn_ss, vc_ptr, vr_ptr,
        mask_ptr, m_sb, m_sh, m_sq, m_sk, lens_ptr, first_ptr,
        HKV, Lq, Lk, R, CHUNK, SINKS,
        G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        M: tl.constexpr,
        K_W0: tl.constexpr, K_W1: tl.constexpr, K_W2: tl.constexpr, K_NSEG: tl.constexpr,
        K_SEGLEN: tl.constexpr, K_SEG_PAD: tl.constexpr, K_OFF1: tl.constexpr,
        K_OFF2: tl.constexpr,
        V_W0: tl.constexpr, V_W1: tl.constexpr, V_W2: tl.constexpr, V_NSEG: tl.constexpr,
        V_SEGLEN: tl.constexpr, V_SEG_PAD: tl.constexpr, V_OFF1: tl.constexpr,
        V_OFF2: tl.constexpr,
        S_NSEG: tl.constexpr, S_SEGLEN: tl.constexpr, S_SEG_PAD: tl.constexpr,
        HAS_QJL: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        MASK_BOOL: tl.constexpr, MASK_KEYS: tl.constexpr, HAS_LENS: tl.constexpr,
        SPLIT: tl.constexpr, HAS_EXACT: tl.constexpr,
        K_MODE: tl.constexpr, V_MODE: tl.constexpr, S_MODE: tl.constexpr, K_PTX: tl.constexpr,
        V_PTX: tl.constexpr, K_HALF: tl.constexpr, V_HALF: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, OUT_BLOCK: tl.constexpr, DEFER_SUM: tl.constexpr,
        SKIP_EMPTY: tl.constexpr):
    """Attention of rows [pid_m * BLOCK_M, +BLOCK_M) of one KV head over one key split.

    q (B, HKV, R, DK) and sq (B, HKV, R, M) are in the dot dtype, pre-scaled by
    scale * log2(e) (sq also by sqrt(pi/2)/M); kc, vc: the fp32 centroids; vr: Pi_v (DV, DV).
    The rotated-domain accumulator is rotated back (@ Pi_v) at the end. SPLIT=False: o
    (B, Hq, Lq, DV), strides o_s*, gets the output. SPLIT=True: o (B, HKV, S, R, DV) float32
    gets the unnormalised rotated-back accumulator and ml (B, HKV, S, R, 2) the running max
    and sum, for `_merge_kernel`; a split that starts past the row's length writes nothing.
    K_*, V_*: `plane_layout` of key and value codes, S_*: `sign_layout` of the QJL signs;
    K_MODE, V_MODE: `decode_tile` modes of keys and values; S_MODE: how the QJL signs are
    decoded (SIGNS, or SIGN_BITS on a GPU). 4-bit keys or values are decoded as two column halves
    (`nibble_halves`, by PTX if K_PTX / V_PTX), each with its own dot.
    K_HALF, V_HALF: kc / vc hold the upper half of a table symmetric about 0 (`table_words`
    mirrors it; K_PTX / V_PTX need it), else the whole table. DEFER_SUM: keep the softmax
    sums per key slot, (BLOCK_N, BLOCK_M), and reduce them once after the key loop instead of
    across warps every tile. MASK_KEYS: the mask is the same
    for every row (no head or query axis): one load per key instead of one per key and row.
    HAS_EXACT (SPLIT only): keys below SINKS and from first[b] (int, (B,)) on are read exact by
    `_merge_kernel`; this kernel reads the compressed keys in between.
    """
    K_HALVES: tl.constexpr = K_W0 == 4 and K_W1 == 0
    V_HALVES: tl.constexpr = V_W0 == 4 and V_W1 == 0
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)  # int64: cache offsets can pass 2**31
    h = pid_bh % HKV
    length = Lk
    if HAS_LENS:
        length = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), Lk)
    stop = length  # compressed keys end here
    if HAS_EXACT:
        stop = tl.minimum(length, tl.load(first_ptr + b).to(tl.int32))
    start = split * CHUNK
    if SPLIT and start >= stop:  # past the compressed keys: `_merge_kernel` reads no partial
        return
    k_words = None
    if K_PTX:
        k_words = table_words(kc_ptr, 8)
    elif K_MODE == PAIRS or K_MODE == PLANES3:
        k_words = table_words(kc_ptr, 1 << K_W0 << K_W1, K_HALF)
    v_words = None
    if V_PTX:
        v_words = table_words(vc_ptr, 8)
    elif V_MODE == PAIRS or V_MODE == PLANES3:
        v_words = table_words(vc_ptr, 1 << V_W0 << V_W1, V_HALF)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    qi = rows // G
    head = h * G + rows % G
    end = tl.minimum(start + CHUNK, stop)
    if IS_CAUSAL:
        last = length - Lq + qi  # last visible key of each row
        end = tl.minimum(end, tl.max(tl.where(row_ok, last, -1), 0) + 1)

    qrow = (pid_bh * R + rows)[None, :]
    if K_HALVES:  # coordinates k and K_SEGLEN + k
        kcol = tl.arange(0, K_SEG_PAD)[:, None]
        kmask = row_ok[None, :] & (kcol < K_SEGLEN)
        q = tl.load(q_ptr + qrow * DK + kcol, mask=kmask, other=0.0)
        q_hi = tl.load(q_ptr + qrow * DK + K_SEGLEN + kcol, mask=kmask, other=0.0)
    else:
        kcoord, kreal = tile_coords(tl.arange(0, K_SEG_PAD * K_NSEG), K_NSEG, K_SEGLEN)
        q = tl.load(q_ptr + qrow * DK + kcoord[:, None], mask=row_ok[None, :] & kreal[:, None],
                    other=0.0)
    sq = q
    if HAS_QJL and S_MODE == SIGN_BITS:  # one tile per sign segment (qjl_logits)
        sq = segments(sq_ptr, pid_bh * R + rows, row_ok, M, S_SEGLEN, S_SEG_PAD)
    elif HAS_QJL:
        scoord, sreal = tile_coords(tl.arange(0, S_SEG_PAD * S_NSEG), S_NSEG, S_SEGLEN)
        sq = tl.load(sq_ptr + qrow * M + scoord[:, None], mask=row_ok[None, :] & sreal[:, None],
                     other=0.0)
    if not V_HALVES:
        vcoord, vreal = tile_coords(tl.arange(0, V_SEG_PAD * V_NSEG), V_NSEG, V_SEGLEN)

    ki_base = ki_ptr + b * ki_sb + h * ki_sh
    kn_base = kn_ptr + b * kn_sb + h * kn_sh
    ks_base = ks_ptr + b * ks_sb + h * ks_sh
    kr_base = kr_ptr + b * kr_sb + h * kr_sh
    vi_base = vi_ptr + b * vi_sb + h * vi_sh
    vn_base = vn_ptr + b * vn_sb + h * vn_sh
    mask_base = mask_ptr + b * m_sb + head[None, :] * m_sh + qi[None, :] * m_sq

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    if DEFER_SUM:
        l_keys = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], tl.float32)
    if V_HALVES:  # coordinates k and V_SEGLEN + k
        acc = tl.zeros([V_SEG_PAD, BLOCK_M], tl.float32)
        acc_hi = tl.zeros([V_SEG_PAD, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([V_SEG_PAD * V_NSEG, BLOCK_M], tl.float32)
    if HAS_EXACT:
        start = tl.maximum(start, SINKS)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        keep = key_ok[:, None] & row_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (keys[:, None] <= last[None, :])
        bias = None
        if HAS_MASK:
            if MASK_KEYS:  # one value per key, shared by every row of the tile
                extra = tl.load(mask_ptr + b * m_sb + keys * m_sk, mask=key_ok, other=0)[:, None]
            else:
                extra = tl.load(mask_base + keys[:, None] * m_sk, mask=keep, other=0)
            if MASK_BOOL:
                keep = keep & (extra != 0)
            else:
                bias = extra.to(tl.float32) * 1.4426950408889634
                keep = keep & (bias != -float("inf"))
        live = True
        if SKIP_EMPTY:  # a tile the mask hides entirely changes nothing: skip its decode
            live = tl.max(tl.max(keep.to(tl.int32), 1), 0) > 0
        if live:
            gamma = tl.zeros([BLOCK_N], tl.float32)
            if HAS_QJL:
                gamma = tl.load(kr_base + keys * kr_ss, mask=key_ok, other=0.0).to(tl.float32)
            if K_HALVES:
                lo, hi = nibble_halves(ki_base + keys[:, None] * ki_ss, key_ok, kc_ptr, k_words,
                                       K_SEGLEN, K_SEG_PAD, K_PTX)
                s = tl.dot(lo.to(q.dtype), q) + tl.dot(hi.to(q.dtype), q_hi)
                if HAS_QJL:
                    s += qjl_logits(sq, ks_base + keys[:, None] * ks_ss, key_ok, gamma, S_NSEG,
                                    S_SEGLEN, S_SEG_PAD, S_MODE, "ieee")
            else:
                s = key_logits(q, sq, ki_base + keys[:, None] * ki_ss,
                               ks_base + keys[:, None] * ks_ss, key_ok, gamma, kc_ptr, k_words,
                               K_W0, K_W1, K_W2, K_NSEG, K_SEGLEN, K_SEG_PAD, K_OFF1, K_OFF2,
                               S_NSEG, S_SEGLEN, S_SEG_PAD, HAS_QJL, K_MODE, S_MODE, "ieee")
            kn = tl.load(kn_base + keys * kn_ss, mask=key_ok, other=0.0).to(tl.float32)
            s = s * kn[:, None]
            if bias is not None:
                s += bias
            s = tl.where(keep, s, -float("inf"))

            m_new = tl.maximum(m_i, tl.max(s, 0))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[None, :])
            alpha = tl.exp2(m_i - m_use)
            if DEFER_SUM:
                l_keys = l_keys * alpha[None, :] + p
            else:
                l_i = l_i * alpha + tl.sum(p, 0)
            m_i = m_new

            vn = tl.load(vn_base + keys * vn_ss, mask=key_ok, other=0.0).to(tl.float32)
            pv = (p * vn[:, None]).to(q.dtype)
            if V_HALVES:
                lo, hi = nibble_halves(vi_base + keys[:, None] * vi_ss, key_ok, vc_ptr, v_words,
                                       V_SEGLEN, V_SEG_PAD, V_PTX)
                acc = acc * alpha[None, :] + tl.dot(tl.trans(lo.to(q.dtype)), pv)
                acc_hi = acc_hi * alpha[None, :] + tl.dot(tl.trans(hi.to(q.dtype)), pv)
            else:
                vals = decode_tile(vi_base + keys[:, None] * vi_ss, key_ok, vc_ptr, v_words, V_W0,
                                   V_W1, V_W2, V_NSEG, V_SEGLEN, V_SEG_PAD, V_OFF1, V_OFF2, V_MODE)
                acc = acc * alpha[None, :] + tl.dot(tl.trans(vals.to(q.dtype)), pv)

    if DEFER_SUM:
        l_i = tl.sum(l_keys, 0)
    if SPLIT:  # rotated-domain partials (coordinate order) for `_merge_kernel`
        part = (pid_bh * tl.num_programs(2) + split) * R + rows
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)
        dst = o_ptr + part[None, :] * DV
        if V_HALVES:
            vcol = tl.arange(0, V_SEG_PAD)[:, None]
            vmask = row_ok[None, :] & (vcol < V_SEGLEN)
            tl.store(dst + vcol, acc, mask=vmask)
            tl.store(dst + V_SEGLEN + vcol, acc_hi, mask=vmask)
        else:
            tl.store(dst + vcoord[:, None], acc, mask=row_ok[None, :] & vreal[:, None])
    else:  # the output, normalised and rotated back (@ Pi_v), OUT_BLOCK columns at a time
        dst = o_ptr + b * o_sb + head[:, None] * o_sh + qi[:, None] * o_ss
        norm = tl.where(l_i > 0, l_i, 1.0)
        for j0 in tl.static_range(0, DV_PAD, OUT_BLOCK):
            cols = j0 + tl.arange(0, OUT_BLOCK)
            col_ok = cols < DV
            if V_HALVES:
                k = tl.arange(0, V_SEG_PAD)
                pi_mask = (k < V_SEGLEN)[:, None] & col_ok[None, :]
                pi_lo = tl.load(vr_ptr + k[:, None] * DV + cols[None, :], mask=pi_mask,
                                other=0.0)
                pi_hi = tl.load(vr_ptr + (V_SEGLEN + k)[:, None] * DV + cols[None, :],
                                mask=pi_mask, other=0.0)
                out = tl.dot(tl.trans(acc), pi_lo, input_precision="tf32x3")
                out = tl.dot(tl.trans(acc_hi), pi_hi, out, input_precision="tf32x3")
            else:
                pi = tl.load(vr_ptr + vcoord[:, None] * DV + cols[None, :],
                             mask=vreal[:, None] & col_ok[None, :], other=0.0)
                out = tl.dot(tl.trans(acc), pi, input_precision="tf32x3")
            tl.store(dst + cols[None, :], (out / norm[:, None]).to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _exact_logits(e0, q_base, q_sd, ek_base, ek_ss, mask_base, m_sk, length, first, last,
                  scale, SINKS, RING, DK: tl.constexpr, DK_BLOCK: tl.constexpr,
                  HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, BLOCK_E: tl.constexpr):
    """Slots [e0, +BLOCK_E) of an `ExactTokens` buffer for one query row: (base-2 logits
    scale * q.k (+ mask), -inf where the slot's position is not read exact or not visible;
    the slots). Slot e < SINKS holds position e, slot SINKS + r the latest position j < length
    with (j - SINKS) % RING == r."""
    slot = e0 + tl.arange(0, BLOCK_E)
    back = length - 1 - slot  # ring slots: how far the latest position lies behind length - 1
    pos = tl.where(slot < SINKS, slot, length - 1 - back % tl.maximum(RING, 1))
    keep = (slot < SINKS + RING) & (pos < length) & (pos <= last)
    keep = keep & ((slot < SINKS) | ((back >= 0) & (pos >= first) & (pos >= SINKS)))
    s = tl.zeros([BLOCK_E], tl.float32)
    for d0 in tl.static_range(0, DK, DK_BLOCK):
        d = d0 + tl.arange(0, DK_BLOCK)
        q = tl.load(q_base + d * q_sd, mask=d < DK, other=0.0).to(tl.float32)
        k = tl.load(ek_base + slot[:, None] * ek_ss + d[None, :],
                    mask=keep[:, None] & (d < DK)[None, :], other=0.0).to(tl.float32)
        s += tl.sum(k * q[None, :], 1)
    s = s * scale
    if HAS_MASK:
        extra = tl.load(mask_base + pos * m_sk, mask=keep, other=0)
        if MASK_BOOL:
            keep = keep & (extra != 0)
        else:
            s += extra.to(tl.float32) * 1.4426950408889634
    return tl.where(keep, s, -float("inf")), slot


@triton.jit
def _merge_kernel(o_ptr, ml_ptr, rot_ptr, out_ptr, out_sb, out_sh, out_ss, lens_ptr, HKV, R,
                  NSPLIT, Lk, CHUNK, q_ptr, q_sb, q_sh, q_ss, q_sd, ek_ptr, ek_sb, ek_sh, ek_ss,
                  ev_ptr, ev_sb, ev_sh, ev_ss, first_ptr, mask_ptr, m_sb, m_sh, m_sq, m_sk,
                  scale, Lq, SINKS, RING, G: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_LENS: tl.constexpr,
                  HAS_EXACT: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                  MASK_BOOL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
                  DK_BLOCK: tl.constexpr, OUT_BLOCK: tl.constexpr):
    """Merge the rotated-domain partials (o, ml as in _attention_kernel) of row program_id(0)
    of KV head program_id(1), BLOCK_S splits per step, rotate the row back (@ Pi_v, rot
    (DV, DV) fp32, fp32 products, OUT_BLOCK columns per step) and write it to out
    (B, Hq, Lq, DV), strides out_s*. Only the splits holding compressed keys below the row's
    length (lens, or Lk; with HAS_EXACT also below first[b]) were written: cdiv(that,
    CHUNK) of the NSPLIT. HAS_EXACT (needs HAS_LENS): the row also attends, in full precision,
    to the `ExactTokens` positions (`_exact_logits`) of ek / ev (B, HKV, SINKS + RING, D),
    with q (B, Hq, Lq, DK), strides q_s*, in its own dtype, scaled by `scale` (log2 e
    included), the causal and attn_mask rules of `_attention_kernel`: one online softmax over
    BLOCK_E slots at a time (each exact key and value read once), its weighted sum added to
    the rotated-back output column block by column block."""
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    live = NSPLIT
    length = Lk
    if HAS_LENS:
        length = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), Lk)
        stop = length
        if HAS_EXACT:
            first = tl.load(first_ptr + b).to(tl.int32)
            stop = tl.minimum(length, first)
        live = tl.minimum(tl.cdiv(stop, CHUNK), NSPLIT)
    coords = tl.arange(0, DV_PAD)
    m_all = tl.full([1], -float("inf"), tl.float32)
    l_all = tl.zeros([1], tl.float32)
    acc = tl.zeros([DV_PAD], tl.float32)
    for s0 in range(0, live, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        ok = splits < live
        part = (pid_bh * NSPLIT + splits) * R + row
        m = tl.load(ml_ptr + part * 2, mask=ok, other=-float("inf"))
        l_s = tl.load(ml_ptr + part * 2 + 1, mask=ok, other=0.0)
        o = tl.load(o_ptr + part[:, None] * DV + coords[None, :],
                    mask=ok[:, None] & (coords < DV)[None, :], other=0.0)
        m_new = tl.maximum(m_all, tl.max(m, 0))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_all - m_use)
        w = tl.exp2(m - m_use)
        l_all = l_all * alpha + tl.sum(w * l_s, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m_all = m_new
    head = pid_bh % HKV * G + row % G
    if HAS_EXACT:  # an online softmax over the exact positions, folded into the merged one
        last = length - 1
        if IS_CAUSAL:
            last = length - Lq + row // G
        q_base = q_ptr + b * q_sb + head * q_sh + row // G * q_ss
        ek_base = ek_ptr + b * ek_sb + pid_bh % HKV * ek_sh
        ev_base = ev_ptr + b * ev_sb + pid_bh % HKV * ev_sh
        mask_base = mask_ptr + b * m_sb + head * m_sh + row // G * m_sq
        m_e = tl.full([1], -float("inf"), tl.float32)
        l_e = tl.zeros([1], tl.float32)
        exact_o = tl.zeros([DV_PAD], tl.float32)
        for e0 in range(0, SINKS + RING, BLOCK_E):
            s, slot = _exact_logits(e0, q_base, q_sd, ek_base, ek_ss, mask_base, m_sk, length,
                                    first, last, scale, SINKS, RING, DK, DK_BLOCK, HAS_MASK,
                                    MASK_BOOL, BLOCK_E)
            m_new = tl.maximum(m_e, tl.max(s, 0))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m_e - m_use)
            p = tl.exp2(s - m_use)
            v = tl.load(ev_base + slot[:, None] * ev_ss + coords[None, :],
                        mask=(p > 0)[:, None] & (coords < DV)[None, :], other=0.0)
            l_e = l_e * alpha + tl.sum(p, 0)
            exact_o = exact_o * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            m_e = m_new
        m_new = tl.maximum(m_all, m_e)
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
        exact_w = tl.exp2(m_e - m_use)
        acc = acc * tl.exp2(m_all - m_use)
        l_all = l_all * tl.exp2(m_all - m_use) + l_e * exact_w
    norm = tl.where(l_all > 0, l_all, 1.0)
    acc = acc / norm
    dst = out_ptr + b * out_sb + head * out_sh + row // G * out_ss
    for j0 in tl.static_range(0, DV_PAD, OUT_BLOCK):
        cols = j0 + tl.arange(0, OUT_BLOCK)
        pi = tl.load(rot_ptr + coords[:, None] * DV + cols[None, :],
                     mask=(coords < DV)[:, None] & (cols < DV)[None, :], other=0.0)
        terms = acc[:, None] * pi
        if HAS_EXACT:  # these columns of the exact values' sum (a register vector: selected)
            terms += tl.where(coords[:, None] == cols[None, :],
                              (exact_o * exact_w / norm)[:, None], 0.0)
        tl.store(dst + cols, tl.sum(terms, 0).to(out_ptr.dtype.element_ty), mask=cols < DV)


def _mode(bits: int) -> int:
    """The `decode_tile` mode of b-bit codes: byte permutes (PAIRS, PLANES3) for 2- and 3-bit
    codes on a GPU (inline PTX, which the interpreter cannot run), else centroid gathers
    (TABLE; 4-bit codes take `nibble_halves`)."""
    if bits in (2, 3) and not INTERPRET:
        return {2: PAIRS, 3: PLANES3}[bits].value
    return TABLE.value


def _table(centroids: torch.Tensor, index_bits: int) -> tuple[torch.Tensor, bool, bool]:
    """(table the kernel reads, whether it is an upper half, whether 4-bit codes decode by PTX)
    for an op's centroids: a symmetric upper half stays one where the kernel builds
    `table_words` from it (PTX 4-bit, byte-permute 2- and 3-bit); gathers need all entries."""
    half = centroids.shape[0] != 1 << index_bits
    ptx = half and index_bits == 4 and not INTERPRET
    if half and not ptx and _mode(index_bits) == TABLE.value:
        return dense(full_table(centroids, index_bits)), False, False
    return dense(centroids), half, ptx


DEEP_DECODE = dict(BLOCK_N=64, num_stages=3, DEFER_SUM=True)  # decode when `deep_pipeline`


def wants_deep_decode(prod_keys: bool, v_index_bits: int) -> bool:
    """Whether decode takes `DEEP_DECODE` tiles: Prod keys, or values of other than 4 bits."""
    return prod_keys or v_index_bits != 4


def config(batch: int, kv_heads: int, rows: int, kv_len: int, device: torch.device,
           tune: dict | None = None, deep_pipeline: bool = False) -> dict:
    """Tile sizes, warps, pipeline stages and the number of key splits for one launch
    (shape-only).

    Decode on a GPU caps registers at 128, so 4 programs fit on a multiprocessor instead of 2,
    with 128-key tiles in one stage; `deep_pipeline` (Prod keys, or values of other than 4
    bits) takes 64-key tiles in three stages instead, and `DEFER_SUM` (not with 128-key tiles:
    their per-key sums would spill past the register cap).
    Splits fill at most one wave of `resident` programs per multiprocessor (4 for GPU decode:
    that many fit at 128 registers and <= 41 KB of shared memory each), never a partial
    second wave, whose few programs would take a whole split's time. OUT_BLOCK: output
    columns per step of the final rotation (registers). `tune` overrides any entry. The
    measurements behind these choices are in BENCHMARKS.md.
    """
    decode = rows <= 16
    cfg = dict(BLOCK_M=16 if decode else 64, BLOCK_N=128 if decode else 64, OUT_BLOCK=32,
               DEFER_SUM=False, SKIP_EMPTY=False, num_warps=4, num_stages=2, resident=2)
    if decode and device.type == "cuda":
        cfg.update(num_stages=1, maxnreg=128, resident=4)
        if deep_pipeline:
            cfg.update(DEEP_DECODE)
    cfg.update(tune or {})
    programs = max(1, batch * kv_heads * cdiv(rows, cfg["BLOCK_M"]))
    splits = max(1, min(cdiv(kv_len, cfg["BLOCK_N"]),
                        cfg.pop("resident") * num_sms(device) // programs))
    chunk = cdiv(cdiv(max(kv_len, 1), splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return dict(cfg, splits=cdiv(max(kv_len, 1), chunk), chunk=chunk)


def fused_attention(query: Tensor, keys: PackedKeys, values: PackedValues, scale: float,
                    is_causal: bool, attn_mask: Tensor | None, kv_lens: Tensor | None,
                    exact: ExactTokens | None = None, tune: dict | None = None) -> Tensor:
    """softmax(scale * q.k_hat + mask) @ v_hat from packed K/V (ARCHITECTURE.md semantics) by
    the fused kernel (split-KV for decode), any shape and mask.

    query (B, Hq, Lq, DK) float16/bfloat16/float32; keys, values: packed (B, Hkv, Lk, .)
    fields and constants; attn_mask bool/float broadcastable to (B, Hq, Lq, Lk); kv_lens (B,)
    int or None; exact: the positions read in full precision, or None (needs kv_lens; as
    `tq::attention`). Returns (B, Hq, Lq, DV) in the query dtype. `tune` overrides `config`
    (benchmarks).
    """
    (k_indices, k_norms, k_signs, k_residual_norms, k_rotation, k_centroids, k_qjl,
     k_index_bits) = keys
    v_indices, v_norms, v_rotation, v_centroids, v_index_bits = values
    batch, q_heads, q_len, dk = query.shape
    kv_heads, kv_len = k_indices.shape[1], k_indices.shape[2]
    dv = v_rotation.shape[0]
    rows = q_len * (q_heads // kv_heads)
    cfg = config(batch, kv_heads, rows, kv_len, query.device, tune,
                 deep_pipeline=wants_deep_decode(k_qjl is not None, v_index_bits))
    splits = cfg.pop("splits")
    chunk = cfg.pop("chunk")

    dot_dtype = torch.float16
    q_rot = rotated_queries(query, k_rotation, kv_heads, scale * LOG2E, dot_dtype)
    has_qjl = k_qjl is not None
    m = k_qjl.shape[0] if has_qjl else 1
    if has_qjl:
        sq = rotated_queries(query, k_qjl, kv_heads,
                             scale * LOG2E * math.sqrt(math.pi / 2) / m, dot_dtype)
        ks, kr = strided(k_signs), strided(k_residual_norms)
    else:
        sq = q_rot
        ks = kr = (k_indices, 0, 0, 0)
    ki, kn = strided(k_indices), strided(k_norms)
    vi, vn = strided(v_indices), strided(v_norms)
    mask_keys = False
    if attn_mask is not None:
        mask = attn_mask.expand(batch, q_heads, q_len, kv_len)
        mask_args = (mask,) + tuple(mask.stride())
        mask_keys = ((q_heads == 1 or mask.stride(1) == 0)
                     and (q_len == 1 or mask.stride(2) == 0))
    else:
        mask_args = (q_rot, 0, 0, 0, 0)
    lens = kv_lens if kv_lens is not None else q_rot

    out = torch.empty(batch, q_heads, q_len, dv, device=query.device, dtype=query.dtype)
    # decode (`config`) and exact tokens: the merge kernel rotates back (and reads them)
    split = splits > 1 or rows <= 16 or exact is not None
    dv_pad = max(16, next_pow2(dv))
    if split:
        part_o = torch.empty(batch, kv_heads, splits, rows, dv, device=query.device,
                             dtype=torch.float32)
        part_ml = torch.empty(batch, kv_heads, splits, rows, 2, device=query.device,
                              dtype=torch.float32)
    else:
        part_o, part_ml = out, out
    grid = (batch * kv_heads, cdiv(rows, cfg["BLOCK_M"]), splits)
    v_rot = dense(v_rotation)
    k_table, k_half, k_ptx = _table(k_centroids, k_index_bits)
    v_table, v_half, v_ptx = _table(v_centroids, v_index_bits)
    first, sinks = (lens, 0) if exact is None else (exact.start, exact.sinks)
    torch.library.wrap_triton(_attention_kernel)[grid](
        q_rot, sq, part_o, *out.stride()[:3], part_ml, *ki, *kn, *ks, *kr, k_table, *vi, *vn,
        v_table, v_rot, *mask_args, lens, first, kv_heads, q_len, kv_len, rows, chunk, sinks,
        G=q_heads // kv_heads, DK=dk, DV=dv, DV_PAD=dv_pad,
        M=m, **prefixed("K_", plane_layout(dk, k_index_bits)),
        **prefixed("V_", plane_layout(dv, v_index_bits)),
        **sign_layout(m if has_qjl else 16),
        HAS_QJL=has_qjl, IS_CAUSAL=bool(is_causal), HAS_MASK=attn_mask is not None,
        MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        MASK_KEYS=mask_keys,
        HAS_LENS=kv_lens is not None, SPLIT=split, HAS_EXACT=exact is not None,
        K_MODE=_mode(k_index_bits),
        V_MODE=_mode(v_index_bits), S_MODE=(SIGNS if INTERPRET else SIGN_BITS).value,
        K_PTX=k_ptx, V_PTX=v_ptx, K_HALF=k_half, V_HALF=v_half, **cfg)
    if split:
        if exact is None:
            exact_args = (q_rot, 0, 0, 0, 0, q_rot, 0, 0, 0, q_rot, 0, 0, 0, lens)
            ring = 0
        else:
            exact_args = (query, *query.stride(), *strided(exact.keys),
                          *strided(exact.values), exact.start)
            ring = exact.keys.shape[2] - sinks
        torch.library.wrap_triton(_merge_kernel)[(rows, batch * kv_heads)](
            part_o, part_ml, v_rot, out, *out.stride()[:3], lens, kv_heads, rows, splits,
            kv_len, chunk, *exact_args, *mask_args, scale * LOG2E, q_len, sinks, ring,
            G=q_heads // kv_heads, DK=dk, DV=dv, DV_PAD=dv_pad, HAS_LENS=kv_lens is not None,
            HAS_EXACT=exact is not None, IS_CAUSAL=bool(is_causal),
            HAS_MASK=attn_mask is not None,
            MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
            BLOCK_S=min(32, next_pow2(splits)), BLOCK_E=32, DK_BLOCK=min(32, next_pow2(dk)),
            OUT_BLOCK=min(32, dv_pad))
    return out
