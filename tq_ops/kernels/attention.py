"""Attention from the compressed K/V cache: a fused kernel, and prefill by decompression.

The fused kernel serves decode and any masked, ragged or chunked call (plain prefills go to
`flash_prefill`: decompression + fp16 SDPA). A program owns one KV head, a tile of BLOCK_M
query rows and one split of the key range. The rows of a KV head are its (query token, group
head) pairs, token-major (row = i * G + g), so every head of a GQA group shares one read and
one decode of each K/V tile. Per K/V tile the kernel unpacks the codes in registers, scores
keys as `n_k * (<Pi_k q, c[idx]> + gamma * <S q, s>)` with tensor-core dots, runs an fp32
online softmax (base 2) and accumulates `p * n_v` against the value centroids in the rotated
domain. Decode splits the key range (flash-decoding) and a second kernel merges the splits; the
launcher rotates queries before and outputs (`@ Pi_v`) after, once per row. The fused kernel
never writes decompressed K or V to memory.
"""

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes
import triton
import triton.language as tl

from ..codebook import lloyd_max
from .codes import (BYTES, PAIRS, PLANES3, SIGN_BITS, SIGNS, TABLE, byte_table, decode_tile,
                    key_logits, nibble_asm, nibble_halves, operand, permute_table, plane_layout,
                    prefixed, qjl_logits, query_rows, strided, tile_coords)
from .decompress import decompress

LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
        q_ptr, sq_ptr, o_ptr, ml_ptr,
        ki_ptr, ki_sb, ki_sh, ki_ss, kn_ptr, kn_sb, kn_sh, kn_ss,
        ks_ptr, ks_sb, ks_sh, ks_ss, kr_ptr, kr_sb, kr_sh, kr_ss, kc_ptr, kw_ptr,
        vi_ptr, vi_sb, vi_sh, vi_ss, vn_ptr, vn_sb, vn_sh, vn_ss, vc_ptr, vw_ptr,
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
        K_MODE: tl.constexpr, V_MODE: tl.constexpr, S_MODE: tl.constexpr, K_ASM: tl.constexpr,
        V_ASM: tl.constexpr, K_WORDS: tl.constexpr, V_WORDS: tl.constexpr, RUN_IF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partial attention of rows [pid_m * BLOCK_M, +BLOCK_M) of one KV head over one split.

    q (B, HKV, R, DK) and sq (B, HKV, R, M) are in the dot dtype, pre-scaled by
    scale * log2(e) (sq also by sqrt(pi/2)/M). SPLIT=False: o (B, HKV, R, DV) float32 gets
    the normalised rotated-domain output. SPLIT=True: o (B, HKV, S, R, DV) gets the
    unnormalised accumulator and ml (B, HKV, S, R, 2) the running max and sum.
    K_*, V_*, S_*: `plane_layout` of key codes, value codes and QJL signs; K_MODE, V_MODE:
    `decode_tile` modes of keys and values (kc/vc: the matching table, from `_lookup`);
    S_MODE: how the QJL signs are decoded (SIGNS, or SIGN_BITS on a GPU).
    4-bit keys or values are decoded as two column halves (`nibble_halves`: K_ASM / V_ASM PTX
    with immediate tables, or () for kc / vc as byte tables), each with its own dot.
    RUN_IF 1 / 2: run only if the `permute_table` words at kw / vw equal / differ from the
    K_WORDS / V_WORDS the PTX was built from (the launcher starts both variants); 0: always.
    """
    K_HALVES: tl.constexpr = K_W0 == 4 and K_W1 == 0
    V_HALVES: tl.constexpr = V_W0 == 4 and V_W1 == 0
    if RUN_IF != 0:
        same = True
        for i in tl.static_range(len(K_WORDS)):
            same = same & (tl.load(kw_ptr + i) == K_WORDS[i])
        for i in tl.static_range(len(V_WORDS)):
            same = same & (tl.load(vw_ptr + i) == V_WORDS[i])
        if same != (RUN_IF == 1):
            return
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
    if K_HALVES:  # coordinates k and K_SEGLEN + k
        kcol = tl.arange(0, K_SEG_PAD)[None, :]
        kmask = row_ok[:, None] & (kcol < K_SEGLEN)
        q = tl.load(q_ptr + qrow * DK + kcol, mask=kmask, other=0.0)
        q_hi = tl.load(q_ptr + qrow * DK + K_SEGLEN + kcol, mask=kmask, other=0.0)
    else:
        kcoord, kreal = tile_coords(tl.arange(0, K_SEG_PAD * K_NSEG), K_NSEG, K_SEGLEN)
        q = tl.load(q_ptr + qrow * DK + kcoord[None, :], mask=row_ok[:, None] & kreal[None, :],
                    other=0.0)
    sq = q
    if HAS_QJL:
        scoord, sreal = tile_coords(tl.arange(0, S_SEG_PAD * S_NSEG), S_NSEG, S_SEGLEN)
        sq = tl.load(sq_ptr + qrow * M + scoord[None, :], mask=row_ok[:, None] & sreal[None, :],
                     other=0.0)
    if not V_HALVES:
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
    if V_HALVES:  # coordinates k and V_SEGLEN + k
        acc = tl.zeros([BLOCK_M, V_SEG_PAD], tl.float32)
        acc_hi = tl.zeros([BLOCK_M, V_SEG_PAD], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, V_SEG_PAD * V_NSEG], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        gamma = tl.zeros([BLOCK_N], tl.float32)
        if HAS_QJL:
            gamma = tl.load(kr_base + keys * kr_ss, mask=key_ok, other=0.0).to(tl.float32)
        if K_HALVES:
            lo, hi = nibble_halves(ki_base + keys[:, None] * ki_ss, key_ok, kc_ptr, K_SEGLEN,
                                   K_SEG_PAD, K_ASM)
            s = tl.dot(q, tl.trans(lo)) + tl.dot(q_hi, tl.trans(hi))
            if HAS_QJL:
                s += qjl_logits(sq, ks_base + keys[:, None] * ks_ss, key_ok, gamma, S_NSEG,
                                S_SEGLEN, S_SEG_PAD, S_MODE, "ieee")
        else:
            s = key_logits(q, sq, ki_base + keys[:, None] * ki_ss,
                           ks_base + keys[:, None] * ks_ss, key_ok, gamma, kc_ptr, K_W0, K_W1,
                           K_W2, K_NSEG, K_SEGLEN, K_SEG_PAD, K_OFF1, K_OFF2, S_NSEG, S_SEGLEN,
                           S_SEG_PAD, HAS_QJL, K_MODE, S_MODE, "ieee")
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

        vn = tl.load(vn_base + keys * vn_ss, mask=key_ok, other=0.0).to(tl.float32)
        pv = (p * vn[None, :]).to(q.dtype)
        if V_HALVES:
            lo, hi = nibble_halves(vi_base + keys[:, None] * vi_ss, key_ok, vc_ptr, V_SEGLEN,
                                   V_SEG_PAD, V_ASM)
            acc = acc * alpha[:, None] + tl.dot(pv, lo.to(q.dtype))
            acc_hi = acc_hi * alpha[:, None] + tl.dot(pv, hi.to(q.dtype))
        else:
            vals = decode_tile(vi_base + keys[:, None] * vi_ss, key_ok, vc_ptr, V_W0, V_W1,
                               V_W2, V_NSEG, V_SEGLEN, V_SEG_PAD, V_OFF1, V_OFF2, V_MODE)
            vals = operand(vals, key_ok, BLOCK_M).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(pv, vals)

    if SPLIT:
        part = (pid_bh * tl.num_programs(2) + split) * R + rows
        out_rows = o_ptr + part[:, None] * DV
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)
        norm = 1.0  # split partials stay unnormalised
    else:
        out_rows = o_ptr + qrow * DV
        norm = tl.where(l_i > 0, l_i, 1.0)[:, None]
    if V_HALVES:
        vcol = tl.arange(0, V_SEG_PAD)[None, :]
        vmask = row_ok[:, None] & (vcol < V_SEGLEN)
        tl.store(out_rows + vcol, acc / norm, mask=vmask)
        tl.store(out_rows + V_SEGLEN + vcol, acc_hi / norm, mask=vmask)
    else:
        tl.store(out_rows + vcoord[None, :], acc / norm, mask=row_ok[:, None] & vreal[None, :])


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
    """(table, decode_tile mode): byte permutes from a `permute_table` for 2- and 3-bit codes
    on a GPU, a byte-indexed table for single-plane codes (4-bit codes: `nibble_halves`'s
    fallback), else the centroids."""
    if bits in (2, 3) and dtype == torch.float16 and _use_ptx():
        return permute_table(centroids), {2: PAIRS, 3: PLANES3}[bits].value
    if bits in (1, 2, 4, 8):
        return byte_table(centroids, bits, dtype), BYTES.value
    return centroids.to(dtype), TABLE.value


@functools.lru_cache
def _lloyd_max_words(dim: int) -> tuple:
    """`permute_table` words of the 4-bit Lloyd-Max codebook for head_dim `dim`: host
    constants, computed outside any fake-tensor or tracing mode the launcher runs under."""
    with _disable_current_modes():
        return tuple(permute_table(lloyd_max(dim, 4).float()).tolist())


def _immediate_words(dim: int, bits: int) -> tuple:
    """The table the 4-bit PTX decode is built with (its immediates), or () where it does not
    apply: other code widths, the interpreter. Calls with another codebook run a byte-table
    variant instead (RUN_IF in `_attention_kernel`)."""
    return _lloyd_max_words(int(dim)) if bits == 4 and _use_ptx() else ()


@functools.lru_cache
def _nibble_ptx(words: tuple) -> tuple:
    """(low, high) `nibble_asm` PTX for a table's words; () for no words."""
    return (nibble_asm(words, False), nibble_asm(words, True)) if words else ()


def config(batch: int, kv_heads: int, rows: int, kv_len: int, device: torch.device,
           tune: dict | None = None) -> dict:
    """Tile sizes, warps and the number of key splits for one launch (shape-only).

    Decode on a GPU caps registers at 128 with one pipeline stage, so 4 programs fit on a
    multiprocessor instead of 2 (measured 1.1-1.2x at batch 32 / 32k, BENCHMARKS.md); splits
    then aim at 4 programs per multiprocessor when (batch, head) programs alone cannot fill the
    GPU, else 2. `tune` overrides any entry.
    """
    decode = rows <= 16
    cfg = dict(BLOCK_M=16 if decode else 64, BLOCK_N=128 if decode else 64, num_warps=4,
               num_stages=2, waves=2)
    if decode and device.type == "cuda":
        fills_gpu = batch * kv_heads >= _num_sms(device)
        cfg.update(num_stages=1, maxnreg=128, waves=2 if fills_gpu else 4)
    cfg.update(tune or {})
    programs = max(1, batch * kv_heads * triton.cdiv(rows, cfg["BLOCK_M"]))
    splits = max(1, min(triton.cdiv(kv_len, cfg["BLOCK_N"]),
                        triton.cdiv(cfg.pop("waves") * _num_sms(device), programs)))
    chunk = triton.cdiv(triton.cdiv(max(kv_len, 1), splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return dict(cfg, splits=triton.cdiv(max(kv_len, 1), chunk), chunk=chunk)


def attention(query, k_indices, k_norms, k_signs, k_residual_norms, k_rotation, k_centroids,
              k_qjl, k_bits, v_indices, v_norms, v_rotation, v_centroids, v_bits, scale,
              is_causal, attn_mask, kv_lens):
    """softmax(scale * q.k_hat + mask) @ v_hat from packed K/V (ARCHITECTURE.md semantics).

    query (B, Hq, Lq, DK) float16/bfloat16/float32; packed K/V fields (B, Hkv, Lk, .);
    attn_mask bool/float broadcastable to (B, Hq, Lq, Lk); kv_lens (B,) int or None.
    Returns (B, Hq, Lq, DV) in the query dtype. Prefills without a mask or ragged lengths
    (`flash_prefill_applies`) decompress K and V and run fp16 flash attention; everything else
    runs the fused kernel (`fused_attention`).
    """
    args = (query, k_indices, k_norms, k_signs, k_residual_norms, k_rotation, k_centroids,
            k_qjl, k_bits, v_indices, v_norms, v_rotation, v_centroids, v_bits, scale,
            is_causal, attn_mask, kv_lens)
    if flash_prefill_applies(query, k_indices, k_norms, v_norms, v_rotation, is_causal,
                             attn_mask, kv_lens):
        return flash_prefill(*args)
    return fused_attention(*args)


def flash_prefill_applies(query, k_indices, k_norms, v_norms, v_rotation, is_causal, attn_mask,
                          kv_lens) -> bool:
    """Whether `flash_prefill` serves this call: more than 16 query rows per KV head, no
    mask, no ragged lengths, causal only with as many queries as keys (SDPA aligns its causal
    mask top-left), equal K/V head dims, fp16 norms (decompressed values then fit in fp16)."""
    _, q_heads, q_len, dk = query.shape
    kv_heads, kv_len = k_indices.shape[1], k_indices.shape[2]
    return (q_len * (q_heads // kv_heads) > 16 and kv_len > 0 and attn_mask is None
            and kv_lens is None and (not is_causal or q_len == kv_len)
            and v_rotation.shape[0] == dk and k_norms.dtype == v_norms.dtype == torch.float16)


def flash_prefill(query, k_indices, k_norms, k_signs, k_residual_norms, k_rotation, k_centroids,
                  k_qjl, k_bits, v_indices, v_norms, v_rotation, v_centroids, v_bits, scale,
                  is_causal, attn_mask, kv_lens):
    """Prefill as `decompress` of K and V to fp16 (B, Hkv, Lk, D) plus fp16 flash attention.

    Prefill is compute-bound: tensor-core attention over fp16 tiles beats decoding every K/V
    tile once per query tile (BENCHMARKS.md). Costs transient memory: the fp16 K and V plus
    `decompress`'s fp32 intermediates, about 10 (MSE keys) to 12 (Prod keys, m = D) * D bytes per
    cached token per KV head at peak. Same arguments as `attention` (attn_mask and kv_lens are
    None here).
    """
    keys = decompress(k_indices, k_norms, k_signs, k_residual_norms, k_rotation, k_centroids,
                      k_qjl, k_bits, torch.float16)
    values = decompress(v_indices, v_norms, None, None, v_rotation, v_centroids, None, v_bits,
                        torch.float16)
    out = F.scaled_dot_product_attention(query.to(torch.float16), keys, values,
                                         is_causal=is_causal, scale=scale, enable_gqa=True)
    return out.to(query.dtype)


def fused_attention(query, k_indices, k_norms, k_signs, k_residual_norms, k_rotation,
                    k_centroids, k_qjl, k_bits, v_indices, v_norms, v_rotation, v_centroids,
                    v_bits, scale, is_causal, attn_mask, kv_lens, tune: dict | None = None):
    """`attention` by the fused kernel (split-KV for decode), any shape and mask; `tune`
    overrides `config` (benchmarks)."""
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
    k_words, v_words = _immediate_words(dk, k_bits), _immediate_words(dv, v_bits)
    k_perm = permute_table(k_centroids) if k_words else k_table
    v_perm = permute_table(v_centroids) if v_words else v_table
    variants = [(0, (), ())]  # (RUN_IF, K_ASM, V_ASM)
    if k_words or v_words:
        variants = [(1, _nibble_ptx(k_words), _nibble_ptx(v_words)), (2, (), ())]
    for run_if, k_asm, v_asm in variants:
        torch.library.wrap_triton(_attention_kernel)[grid](
            q_rot, sq, part_o, part_ml, *ki, *kn, *ks, *kr, k_table, k_perm, *vi, *vn, v_table,
            v_perm, *mask_args, lens, kv_heads, q_len, kv_len, rows, chunk,
            G=q_heads // kv_heads, DK=dk, DV=dv, M=m, **prefixed("K_", plane_layout(dk, k_bits)),
            **prefixed("V_", plane_layout(dv, v_bits)),
            **prefixed("S_", plane_layout(m if has_qjl else 16, 1)),
            HAS_QJL=has_qjl, IS_CAUSAL=bool(is_causal), HAS_MASK=attn_mask is not None,
            MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
            HAS_LENS=kv_lens is not None, SPLIT=splits > 1, K_MODE=k_mode, V_MODE=v_mode,
            S_MODE=(SIGN_BITS if _use_ptx() else SIGNS).value, K_ASM=k_asm, V_ASM=v_asm,
            K_WORDS=k_words, V_WORDS=v_words, RUN_IF=run_if, **cfg)
    if splits > 1:
        block = 16
        torch.library.wrap_triton(_merge_kernel)[(batch * kv_heads, triton.cdiv(rows, block))](
            part_o, part_ml, out_rot, rows, splits, DV=dv, DV_PAD=triton.next_power_of_2(dv),
            BLOCK_M=block)
    out = out_rot @ v_rotation
    group = q_heads // kv_heads
    out = out.view(batch, kv_heads, q_len, group, dv).transpose(2, 3)
    return out.reshape(batch, q_heads, q_len, dv).to(query.dtype)
