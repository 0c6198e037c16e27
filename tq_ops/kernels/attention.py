"""Fused attention straight from the compressed K/V cache (decode and prefill).

One kernel serves both: a program owns one KV head, a tile of BLOCK_M query rows and one
split of the key range. The rows of a KV head are its (query token, group head) pairs,
token-major (row = i * G + g), so every head of a GQA group shares one read and one decode
of each K/V tile. Per K/V tile the kernel unpacks the codes in registers, scores keys as
`n_k * (<Pi_k q, c[idx]> + gamma * <S q, s>)` with tensor-core dots, runs an fp32 online
softmax (base 2) and accumulates `p * n_v` against the value centroids in the rotated
domain. Decode splits the key range (flash-decoding) and a second kernel merges the
splits; the launcher rotates queries before and outputs (`@ Pi_v`) after, once per row.
Decompressed K or V never reach memory.
"""

import math
import os

import torch
import triton
import triton.language as tl

from .codes import (BYTES, NIBBLES, PAIRS, PLANES3, SIGN_BITS, SIGNS, TABLE, byte_table,
                    decode_tile, key_logits, operand, permute_table, plane_layout, prefixed,
                    query_rows, strided, tile_coords)

LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
        q_ptr, sq_ptr, o_ptr, ml_ptr,
        ki_ptr, ki_sb, ki_sh, ki_ss, kn_ptr, kn_sb, kn_sh, kn_ss,
        ks_ptr, ks_sb, ks_sh, ks_ss, kr_ptr, kr_sb, kr_sh, kr_ss, kc_ptr,
        vi_ptr, vi_sb, vi_sh, vi_ss, vn_ptr, vn_sb, vn_sh, vn_ss, vc_ptr,
        mask_ptr, m_sb, m_sh, m_sq, m_sk, lens_ptr,
        HKV, Lq, Lk, R, CHUNK,
        G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
        K_W0: tl.constexpr, K_W1: tl.constexpr, K_W2: tl.constexpr, K_NSEG: tl.constexpr,
        K_SEGLEN: tl.constexpr, K_SEG_PAD: tl.constexpr, K_OFF1: tl.constexpr,
        K_OFF2: tl.constexpr,
        V_W0: tl.constexpr, V_W1: tl.constexpr, V_W2: tl.constexpr, V_NSEG: tl.constexpr,
        V_SEGLEN: tl.constexpr, V_SEG_PAD: tl.constexpr, V_OFF1: tl.constexpr,
        V_OFF2: tl.constexpr,
        S_W0: tl.constexpr, S_W1: tl.constexpr, S_W2: tl.constexpr, S_NSEG: tl.constexpr,
        S_SEGLEN: tl.constexpr, S_SEG_PAD: tl.constexpr, S_OFF1: tl.constexpr,
        S_OFF2: tl.constexpr,
        HAS_QJL: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        MASK_BOOL: tl.constexpr, HAS_LENS: tl.constexpr, SPLIT: tl.constexpr,
        K_MODE: tl.constexpr, V_MODE: tl.constexpr, S_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """Partial attention of rows [pid_m * BLOCK_M, +BLOCK_M) of one KV head over one split.

    q (B, HKV, R, DK) and sq (B, HKV, R, M) are in the dot dtype, pre-scaled by
    scale * log2(e) (sq also by sqrt(pi/2)/M). SPLIT=False: o (B, HKV, R, DV) float32 gets
    the normalised rotated-domain output. SPLIT=True: o (B, HKV, S, R, DV) gets the
    unnormalised accumulator and ml (B, HKV, S, R, 2) the running max and sum.
    K_*, V_*, S_*: `plane_layout` of key codes, value codes and QJL signs; K_MODE, V_MODE:
    `decode_tile` modes of keys and values (kc/vc: the matching table, from `_lookup`);
    S_MODE: how the QJL signs are decoded (SIGNS, or SIGN_BITS on a GPU).
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)  # int64: cache offsets can pass 2**31
    h = pid_bh % HKV

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    qi = rows // G
    head = h * G + rows % G
    length = Lk
    if HAS_LENS:
        length = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), Lk)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    if IS_CAUSAL:
        last = length - Lq + qi  # last visible key of each row
        end = tl.minimum(end, tl.max(tl.where(row_ok, last, -1), 0) + 1)

    qrow = (pid_bh * R + rows)[:, None]
    kcoord, kreal = tile_coords(tl.arange(0, K_SEG_PAD * K_NSEG), K_NSEG, K_SEGLEN)
    q = tl.load(q_ptr + qrow * DK + kcoord[None, :], mask=row_ok[:, None] & kreal[None, :],
                other=0.0)
    sq = q
    if HAS_QJL:
        scoord, sreal = tile_coords(tl.arange(0, S_SEG_PAD * S_NSEG), S_NSEG, S_SEGLEN)
        sq = tl.load(sq_ptr + qrow * M + scoord[None, :], mask=row_ok[:, None] & sreal[None, :],
                     other=0.0)
    vcoord, vreal = tile_coords(tl.arange(0, V_SEG_PAD * V_NSEG), V_NSEG, V_SEGLEN)

    ki_base = ki_ptr + b * ki_sb + h * ki_sh
    kn_base = kn_ptr + b * kn_sb + h * kn_sh
    ks_base = ks_ptr + b * ks_sb + h * ks_sh
    kr_base = kr_ptr + b * kr_sb + h * kr_sh
    vi_base = vi_ptr + b * vi_sb + h * vi_sh
    vn_base = vn_ptr + b * vn_sb + h * vn_sh
    mask_base = mask_ptr + b * m_sb + head[:, None] * m_sh + qi[:, None] * m_sq

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, V_SEG_PAD * V_NSEG], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        gamma = tl.zeros([BLOCK_N], tl.float32)
        if HAS_QJL:
            gamma = tl.load(kr_base + keys * kr_ss, mask=key_ok, other=0.0).to(tl.float32)
        s = key_logits(q, sq, ki_base + keys[:, None] * ki_ss, ks_base + keys[:, None] * ks_ss,
                       key_ok, gamma, kc_ptr, K_W0, K_W1, K_W2, K_NSEG, K_SEGLEN, K_SEG_PAD,
                       K_OFF1, K_OFF2, S_NSEG, S_SEGLEN, S_SEG_PAD, HAS_QJL, K_MODE, S_MODE,
                       "ieee")
        kn = tl.load(kn_base + keys * kn_ss, mask=key_ok, other=0.0).to(tl.float32)
        s = s * kn[None, :]
        keep = key_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            keep = keep & (keys[None, :] <= last[:, None])
        if HAS_MASK:
            extra = tl.load(mask_base + keys[None, :] * m_sk, mask=keep, other=0)
            if MASK_BOOL:
                keep = keep & (extra != 0)
            else:
                s += extra.to(tl.float32) * 1.4426950408889634
        s = tl.where(keep, s, -float("inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

        vals = decode_tile(vi_base + keys[:, None] * vi_ss, key_ok, vc_ptr, V_W0, V_W1, V_W2,
                           V_NSEG, V_SEGLEN, V_SEG_PAD, V_OFF1, V_OFF2, V_MODE)
        vals = operand(vals, key_ok, BLOCK_M).to(q.dtype)
        vn = tl.load(vn_base + keys * vn_ss, mask=key_ok, other=0.0).to(tl.float32)
        pv = (p * vn[None, :]).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(pv, vals)

    out_mask = row_ok[:, None] & vreal[None, :]
    if SPLIT:
        nsplit = tl.num_programs(2)
        part = (pid_bh * nsplit + split) * R + rows
        tl.store(o_ptr + part[:, None] * DV + vcoord[None, :], acc, mask=out_mask)
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + qrow * DV + vcoord[None, :], out, mask=out_mask)


@triton.jit
def _merge_kernel(o_ptr, ml_ptr, out_ptr, R, NSPLIT, DV: tl.constexpr, DV_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """Merge NSPLIT partial results (o, ml as in _attention_kernel) into out (B, HKV, R, DV)."""
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    cols = tl.arange(0, DV_PAD)
    mask = row_ok[:, None] & (cols < DV)[None, :]
    m_all = tl.full([BLOCK_M], -float("inf"), tl.float32)
    for s in range(NSPLIT):
        part = (pid_bh * NSPLIT + s) * R + rows
        m_all = tl.maximum(m_all, tl.load(ml_ptr + part * 2, mask=row_ok, other=-float("inf")))
    m_use = tl.where(m_all == -float("inf"), 0.0, m_all)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for s in range(NSPLIT):
        part = (pid_bh * NSPLIT + s) * R + rows
        w = tl.exp2(tl.load(ml_ptr + part * 2, mask=row_ok, other=-float("inf")) - m_use)
        l_all += w * tl.load(ml_ptr + part * 2 + 1, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(o_ptr + part[:, None] * DV + cols[None, :], mask=mask,
                                    other=0.0)
    out = acc / tl.where(l_all > 0, l_all, 1.0)[:, None]
    tl.store(out_ptr + (pid_bh * R + rows)[:, None] * DV + cols[None, :], out, mask=mask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _use_ptx() -> bool:
    """The byte-permute decode modes are inline PTX, which the Triton interpreter cannot run."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def _lookup(centroids: torch.Tensor, bits: int, dtype: torch.dtype):
    """(table, decode_tile mode): byte permutes from a `permute_table` for 2- to 4-bit codes
    on a GPU, a byte-indexed table for other single-plane codes, else the centroids."""
    if bits in (2, 3, 4) and dtype == torch.float16 and _use_ptx():
        return permute_table(centroids), {2: PAIRS, 3: PLANES3, 4: NIBBLES}[bits].value
    if bits in (1, 2, 4, 8):
        return byte_table(centroids, bits, dtype), BYTES.value
    return centroids.to(dtype), TABLE.value


def config(batch: int, kv_heads: int, rows: int, kv_len: int, device: torch.device,
           tune: dict | None = None) -> dict:
    """Tile sizes, warps and the number of key splits for one launch (shape-only).

    Splits give about `waves` programs per multiprocessor; `tune` overrides any entry.
    """
    decode = rows <= 16
    cfg = dict(BLOCK_M=16 if decode else 64, BLOCK_N=128 if decode else 64, num_warps=4,
               num_stages=2, waves=2)
    cfg.update(tune or {})
    programs = max(1, batch * kv_heads * triton.cdiv(rows, cfg["BLOCK_M"]))
    splits = max(1, min(triton.cdiv(kv_len, cfg["BLOCK_N"]),
                        triton.cdiv(cfg.pop("waves") * _num_sms(device), programs)))
    chunk = triton.cdiv(triton.cdiv(max(kv_len, 1), splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return dict(cfg, splits=triton.cdiv(max(kv_len, 1), chunk), chunk=chunk)


def attention(query, k_indices, k_norms, k_signs, k_residual_norms, k_rotation, k_centroids,
              k_qjl, k_bits, v_indices, v_norms, v_rotation, v_centroids, v_bits, scale,
              is_causal, attn_mask, kv_lens, tune: dict | None = None):
    """softmax(scale * q.k_hat + mask) @ v_hat from packed K/V (ARCHITECTURE.md semantics).

    query (B, Hq, Lq, DK) float16/bfloat16/float32; packed K/V fields (B, Hkv, Lk, .);
    attn_mask bool/float broadcastable to (B, Hq, Lq, Lk); kv_lens (B,) int or None.
    Returns (B, Hq, Lq, DV) in the query dtype. `tune` overrides `config` (benchmarks).
    """
    batch, q_heads, q_len, dk = query.shape
    kv_heads, kv_len = k_indices.shape[1], k_indices.shape[2]
    dv = v_rotation.shape[0]
    rows = q_len * (q_heads // kv_heads)
    cfg = config(batch, kv_heads, rows, kv_len, query.device, tune)
    splits = cfg.pop("splits")
    chunk = cfg.pop("chunk")

    dot_dtype = torch.float16
    qf = query.float()
    q_rot = (query_rows(qf @ k_rotation.T, kv_heads) * (scale * LOG2E)).to(dot_dtype)
    has_qjl = k_qjl is not None
    m = k_qjl.shape[0] if has_qjl else 1
    if has_qjl:
        sketch = qf @ k_qjl.T * (scale * LOG2E * math.sqrt(math.pi / 2) / m)
        sq = query_rows(sketch, kv_heads).to(dot_dtype)
        ks, kr = strided(k_signs), strided(k_residual_norms)
    else:
        sq = q_rot
        ks = kr = (k_indices, 0, 0, 0)
    ki, kn = strided(k_indices), strided(k_norms)
    vi, vn = strided(v_indices), strided(v_norms)
    if attn_mask is not None:
        mask = attn_mask.expand(batch, q_heads, q_len, kv_len)
        mask_args = (mask,) + tuple(mask.stride())
    else:
        mask_args = (q_rot, 0, 0, 0, 0)
    lens = kv_lens if kv_lens is not None else q_rot

    out_rot = torch.empty(batch, kv_heads, rows, dv, device=query.device, dtype=torch.float32)
    if splits > 1:
        part_o = torch.empty(batch, kv_heads, splits, rows, dv, device=query.device,
                             dtype=torch.float32)
        part_ml = torch.empty(batch, kv_heads, splits, rows, 2, device=query.device,
                              dtype=torch.float32)
    else:
        part_o, part_ml = out_rot, out_rot
    grid = (batch * kv_heads, triton.cdiv(rows, cfg["BLOCK_M"]), splits)
    k_table, k_mode = _lookup(k_centroids, k_bits, dot_dtype)
    v_table, v_mode = _lookup(v_centroids, v_bits, dot_dtype)
    torch.library.wrap_triton(_attention_kernel)[grid](
        q_rot, sq, part_o, part_ml, *ki, *kn, *ks, *kr, k_table, *vi, *vn, v_table,
        *mask_args, lens, kv_heads, q_len, kv_len, rows, chunk,
        G=q_heads // kv_heads, DK=dk, DV=dv, M=m, **prefixed("K_", plane_layout(dk, k_bits)),
        **prefixed("V_", plane_layout(dv, v_bits)),
        **prefixed("S_", plane_layout(m if has_qjl else 16, 1)),
        HAS_QJL=has_qjl, IS_CAUSAL=bool(is_causal), HAS_MASK=attn_mask is not None,
        MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        HAS_LENS=kv_lens is not None, SPLIT=splits > 1, K_MODE=k_mode, V_MODE=v_mode,
        S_MODE=(SIGN_BITS if _use_ptx() else SIGNS).value, **cfg)
    if splits > 1:
        block = 16
        torch.library.wrap_triton(_merge_kernel)[(batch * kv_heads, triton.cdiv(rows, block))](
            part_o, part_ml, out_rot, rows, splits, DV=dv, DV_PAD=triton.next_power_of_2(dv),
            BLOCK_M=block)
    out = out_rot @ v_rotation
    group = q_heads // kv_heads
    out = out.view(batch, kv_heads, q_len, group, dv).transpose(2, 3)
    return out.reshape(batch, q_heads, q_len, dv).to(query.dtype)
