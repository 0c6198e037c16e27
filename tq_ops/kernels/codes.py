"""Shared Triton helpers that decode the split-plane packed cache (layout in ARCHITECTURE.md).

A b-bit code is stored in planes of width W0 > W1 > W2 (0 = absent), widest (high-order)
first; in a plane of width w, coordinate j sits in byte `j % seg_w` at bit
`(j // seg_w) * w`, with seg_w = dim * w / 8. The narrowest plane cuts the coordinates into
NSEG = 8 / w_min "finest segments" of SEGLEN = dim / NSEG coordinates, and segment f of
every plane is the byte run `[(f % R) * SEGLEN, +SEGLEN)` shifted right by `(f // R) * w`
(R = seg_w / SEGLEN). A tile is decoded segment by segment from contiguous byte runs (vector
loads, constant shifts, no repeated loads) and the segments are interleaved with
`tl.join`, so tile column `k * NSEG + f` holds coordinate `f * SEGLEN + k`
(`tile_coords`). Dot partners (rotated queries) are loaded in the same column order, so
nothing is ever shuffled back into coordinate order except the final output.
"""

import torch
import triton
import triton.language as tl

from ..packing import plane_widths

TABLE = tl.constexpr(0)  # decode_tile MODE: codes -> centroid table values
SIGNS = tl.constexpr(1)  # decode_tile MODE: 1-bit codes -> QJL signs +-1.0
BYTES = tl.constexpr(2)  # decode_tile MODE: single-plane codes -> `byte_table`[segment, byte]
SIGN_BITS = tl.constexpr(4)  # decode_tile MODE: QJL sign bits -> fp16 +-1.0 by shifts and lop3
PLANES3 = tl.constexpr(5)  # decode_tile MODE: 3-bit codes (2 + 1 planes) -> fp16 by byte permutes
PAIRS = tl.constexpr(6)  # decode_tile MODE: 2-bit codes (one plane) -> fp16 by byte permutes


def permute_table(centroids: torch.Tensor) -> torch.Tensor:
    """int32 words for the byte-permute modes (4, 8 or 16 centroids -> 2, 4 or 8 words): the low
    bytes, then the high bytes, of the fp16 centroids, entry i in byte i % 4 of word i // 4
    (little-endian). Torch ops only (trace-safe)."""
    half = centroids.to(torch.float16).view(torch.int16).to(torch.int32)
    lanes = torch.stack([half & 0xFF, (half >> 8) & 0xFF]).view(2, -1, 4)
    shifts = torch.arange(4, device=centroids.device, dtype=torch.int32) * 8
    words = (lanes.to(torch.int64) << shifts).sum(-1).flatten()
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def byte_table(centroids: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Table (8 // bits * 256,) in `dtype` for single-plane codes (bits in 1, 2, 4, 8).

    Entry [i * 256 + byte] is the centroid of the code in bit lane i of `byte`, so the
    kernel indexes with the raw byte (no shift or mask). Torch ops only (trace-safe).
    """
    lanes = torch.arange(8 // bits, device=centroids.device) * bits
    byte = torch.arange(256, device=centroids.device)
    return centroids[(byte[None, :] >> lanes[:, None]) & ((1 << bits) - 1)].to(dtype).flatten()


def query_rows(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, Lq, D) -> (B, Hkv, Lq * G, D) contiguous, row = token * G + group head."""
    batch, q_heads, q_len, dim = x.shape
    group = q_heads // kv_heads
    return x.view(batch, kv_heads, group, q_len, dim).transpose(2, 3).reshape(
        batch, kv_heads, q_len * group, dim)


def strided(t: torch.Tensor) -> tuple:
    """(tensor with unit last stride, stride_b, stride_h, stride_s) of a (B, H, S, .) tensor."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(2)


def plane_layout(dim: int, bits: int) -> dict:
    """Constexpr description of `dim` codes of `bits` bits (bits = 1 also describes signs).

    W0..W2: plane widths (0 = absent); NSEG, SEGLEN, SEG_PAD: finest segments, their
    length and its power-of-two padding; OFF1, OFF2: byte offsets of planes 1 and 2.
    """
    widths = list(plane_widths(bits)) if bits > 0 else []
    nseg = 8 // min(widths) if widths else 1
    if dim % nseg:
        raise ValueError(f"the CUDA kernels need head_dim (or qjl_dim) divisible by {nseg} "
                         f"for {bits}-bit codes, got {dim}")
    if triton.next_power_of_2(dim // nseg) * nseg < 16:
        raise ValueError(f"the CUDA kernels need head_dim (or qjl_dim) >= 16, got {dim}")
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + dim * w // 8)
    widths += [0] * (3 - len(widths))
    offsets += [0] * (4 - len(offsets))
    return dict(W0=widths[0], W1=widths[1], W2=widths[2], NSEG=nseg, SEGLEN=dim // nseg,
                SEG_PAD=triton.next_power_of_2(dim // nseg), OFF1=offsets[1], OFF2=offsets[2])


def prefixed(prefix: str, layout: dict) -> dict:
    """The same layout with every key prefixed (e.g. K_W0), for kernels reading K and V."""
    return {prefix + key: value for key, value in layout.items()}


@triton.jit
def tile_coords(cols, NSEG: tl.constexpr, SEGLEN: tl.constexpr):
    """Coordinate held by each tile column, and whether it is a real (unpadded) one."""
    k = cols // NSEG
    return (cols % NSEG) * SEGLEN + k, k < SEGLEN


@triton.jit
def _plane_bits(row_ptr, mask, k, W: tl.constexpr, BASE: tl.constexpr, F: tl.constexpr,
                NSEG: tl.constexpr, SEGLEN: tl.constexpr):
    R: tl.constexpr = NSEG * W // 8
    byte = tl.load(row_ptr + BASE + (F % R) * SEGLEN + k[None, :], mask=mask, other=0)
    return (byte.to(tl.int32) >> ((F // R) * W)) & ((1 << W) - 1)


@triton.jit
def _segment(row_ptr, mask, k, cent_ptr, F: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
             W2: tl.constexpr, NSEG: tl.constexpr, SEGLEN: tl.constexpr, OFF1: tl.constexpr,
             OFF2: tl.constexpr, MODE: tl.constexpr):
    """Values [BLOCK_N, SEG_PAD] of finest segment F (coordinates F * SEGLEN + k)."""
    if MODE == BYTES:
        R: tl.constexpr = NSEG * W0 // 8
        byte = tl.load(row_ptr + (F % R) * SEGLEN + k[None, :], mask=mask, other=0)
        val = tl.load(cent_ptr + (F // R) * 256 + byte.to(tl.int32))
    else:
        code = tl.where(mask, 0, 0)
        if W0 > 0:
            code = _plane_bits(row_ptr, mask, k, W0, 0, F, NSEG, SEGLEN)
        if W1 > 0:
            code = (code << W1) | _plane_bits(row_ptr, mask, k, W1, OFF1, F, NSEG, SEGLEN)
        if W2 > 0:
            code = (code << W2) | _plane_bits(row_ptr, mask, k, W2, OFF2, F, NSEG, SEGLEN)
        if MODE == SIGNS:
            val = tl.where(code != 0, 1.0, -1.0)
        else:
            val = tl.load(cent_ptr + code)
    return val


@triton.jit
def _flat(x):
    return tl.reshape(x, [x.shape[0], x.numel // x.shape[0]])


def nibble_asm(words: tuple, high: bool) -> str:
    """PTX for `nibble_half`: 4 packed bytes ($2) -> fp16 centroids of their low (high=False)
    or high nibbles ($0: bytes 0 and 1, $1: bytes 2 and 3); `words`, the 8 `permute_table`
    words of a 16-entry codebook, become immediates."""
    # The four codes go into prmt selector nibbles; entries 0-7 and 8-15 are looked up apart
    # (bit 3 cleared) and merged by a byte mask made from bit 3 with prmt's sign-replicate
    # mode; two prmt's interleave low and high bytes: 15-16 instructions per 4 codes, no memory
    # access. One operand keeps the asm unary and elementwise, which lets Triton convert the
    # packed bytes (not the fp16 values) to the tensor-core operand layout.
    w = [f"0x{x & 0xFFFFFFFF:08X}" for x in words]
    take = "shr.b32 x, $2, 4; and.b32 x, x, 0x0F0F0F0F; " if high else "and.b32 x, $2, 0x0F0F0F0F; "
    return ("{ .reg .b32 x, t, sel, s7, y, m, a, b, lo, hi; " + take
            + "shr.b32 t, x, 4; or.b32 t, t, x; prmt.b32 sel, t, 0, 0x4420; "
            "and.b32 s7, sel, 0x7777; shl.b32 y, x, 4; prmt.b32 m, y, y, 0xBA98; "
            f"prmt.b32 a, {w[0]}, {w[1]}, s7; prmt.b32 b, {w[2]}, {w[3]}, s7; "
            "lop3.b32 lo, a, b, m, 0xD8; "
            f"prmt.b32 a, {w[4]}, {w[5]}, s7; prmt.b32 b, {w[6]}, {w[7]}, s7; "
            "lop3.b32 hi, a, b, m, 0xD8; "
            "prmt.b32 $0, lo, hi, 0x5140; prmt.b32 $1, lo, hi, 0x7362; }")


@triton.jit
def nibble_half(byte, ASM: tl.constexpr):
    """fp16 centroids of one nibble of each uint8 `byte` (any shape), by `nibble_asm` PTX."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,r", [byte], dtype=tl.float16, is_pure=True,
                                     pack=4)


@triton.jit
def nibble_halves(row_ptr, key_ok, cent_ptr, SEGLEN: tl.constexpr, SEG_PAD: tl.constexpr,
                  ASM: tl.constexpr):
    """4-bit codes of packed rows as two tiles [BLOCK_N, SEG_PAD]: coordinates k and
    SEGLEN + k (low and high nibble of byte k). ASM: (low, high) `nibble_asm` PTX, or () to
    index cent_ptr, a 4-bit `byte_table` (any codebook; the interpreter). Padded columns and
    masked rows hold the value of code 0 (callers zero their partners)."""
    k = tl.arange(0, SEG_PAD)
    byte = tl.load(row_ptr + k[None, :], mask=key_ok[:, None] & (k < SEGLEN)[None, :], other=0)
    if len(ASM) == 0:
        lo = tl.load(cent_ptr + byte.to(tl.int32))
        hi = tl.load(cent_ptr + 256 + byte.to(tl.int32))
    else:
        lo = nibble_half(byte, tl.constexpr(ASM[0]))
        hi = nibble_half(byte, tl.constexpr(ASM[1]))
    return lo, hi


@triton.jit
def _sign_values(byte):
    """QJL signs +-1.0 (fp16) of bits 0..7 of uint8 `byte`, eight tensors (SIGN_BITS mode)."""
    # Per 4 packed bytes ($16): lo / hi hold bytes 0, 1 / 2, 3 in the low byte of each 16-bit
    # half; shifting by 15 - f moves bit f to both halves' sign positions, and one lop3 makes
    # (~bit) << 15 | 1.0, i.e. +1.0 where the bit is set: 2 instructions per 2 signs.
    return tl.inline_asm_elementwise(
        "{ "
        ".reg .b32 lo, hi, t, z, m, one; "
        "mov.b32 z, 0; "
        "mov.b32 m, 0x80008000; "
        "mov.b32 one, 0x3C003C00; "
        "prmt.b32 lo, $16, z, 0x4140; "
        "prmt.b32 hi, $16, z, 0x4342; "
        "shl.b32 t, lo, 15; lop3.b32 $0, t, m, one, 0xAE; "
        "shl.b32 t, hi, 15; lop3.b32 $1, t, m, one, 0xAE; "
        "shl.b32 t, lo, 14; lop3.b32 $2, t, m, one, 0xAE; "
        "shl.b32 t, hi, 14; lop3.b32 $3, t, m, one, 0xAE; "
        "shl.b32 t, lo, 13; lop3.b32 $4, t, m, one, 0xAE; "
        "shl.b32 t, hi, 13; lop3.b32 $5, t, m, one, 0xAE; "
        "shl.b32 t, lo, 12; lop3.b32 $6, t, m, one, 0xAE; "
        "shl.b32 t, hi, 12; lop3.b32 $7, t, m, one, 0xAE; "
        "shl.b32 t, lo, 11; lop3.b32 $8, t, m, one, 0xAE; "
        "shl.b32 t, hi, 11; lop3.b32 $9, t, m, one, 0xAE; "
        "shl.b32 t, lo, 10; lop3.b32 $10, t, m, one, 0xAE; "
        "shl.b32 t, hi, 10; lop3.b32 $11, t, m, one, 0xAE; "
        "shl.b32 t, lo, 9; lop3.b32 $12, t, m, one, 0xAE; "
        "shl.b32 t, hi, 9; lop3.b32 $13, t, m, one, 0xAE; "
        "shl.b32 t, lo, 8; lop3.b32 $14, t, m, one, 0xAE; "
        "shl.b32 t, hi, 8; lop3.b32 $15, t, m, one, 0xAE; "
        "} ",
        "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r",
        [byte], dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                       tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _two_bit_values(byte, tab_ptr):
    """fp16 centroids of the 4 segments of 2-bit codes in uint8 `byte` (PAIRS mode), four
    tensors; tab_ptr holds the 2 words of a 4-entry `permute_table`."""
    # Per 4 packed bytes ($8): field F of each byte goes to bits 0-1, the four codes are
    # packed into prmt selector nibbles, and two prmt's look up the low and high bytes of the
    # 4 fp16 entries: 9 to 10 instructions per 4 codes, no memory access.
    return tl.inline_asm_elementwise(
        "{ "
        ".reg .b32 z, x, t, sel, lo, hi; "
        "mov.b32 z, 0; "
        "and.b32 x, $8, 0x03030303; "
        "shr.b32 t, x, 4; or.b32 t, t, x; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $9, $9, sel; prmt.b32 hi, $13, $13, sel; "
        "prmt.b32 $0, lo, hi, 0x5140; prmt.b32 $1, lo, hi, 0x7362; "
        "shr.b32 x, $8, 2; and.b32 x, x, 0x03030303; "
        "shr.b32 t, x, 4; or.b32 t, t, x; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $9, $9, sel; prmt.b32 hi, $13, $13, sel; "
        "prmt.b32 $2, lo, hi, 0x5140; prmt.b32 $3, lo, hi, 0x7362; "
        "shr.b32 x, $8, 4; and.b32 x, x, 0x03030303; "
        "shr.b32 t, x, 4; or.b32 t, t, x; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $9, $9, sel; prmt.b32 hi, $13, $13, sel; "
        "prmt.b32 $4, lo, hi, 0x5140; prmt.b32 $5, lo, hi, 0x7362; "
        "shr.b32 x, $8, 6; and.b32 x, x, 0x03030303; "
        "shr.b32 t, x, 4; or.b32 t, t, x; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $9, $9, sel; prmt.b32 hi, $13, $13, sel; "
        "prmt.b32 $6, lo, hi, 0x5140; prmt.b32 $7, lo, hi, 0x7362; "
        "} ",
        "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        [byte, tl.load(tab_ptr), tl.load(tab_ptr + 1)],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _three_bit_values(a, b, c, tab_ptr):
    """fp16 centroids of the 8 segments of 3-bit codes (PLANES3 mode), eight tensors: uint8
    `a`, `b` are the 2-bit plane's two byte runs (segments 0, 2, 4, 6 and 1, 3, 5, 7), `c` the
    1-bit plane's; tab_ptr holds the 4 words of an 8-entry `permute_table`."""
    # Per 4 packed columns ($16 a, $17 b, $18 c): for segment F, the 2-bit field of a (F even)
    # or b at bits 2 * (F // 2) goes to bits 1-2 of each byte, bit F of c to bit 0; the four
    # 3-bit codes are packed into prmt selector nibbles, and two prmt's look up the low and
    # high bytes of the 8 fp16 entries: 11 instructions per 4 codes, no memory access.
    return tl.inline_asm_elementwise(
        "{ "
        ".reg .b32 z, x, c, v, t, sel, lo, hi; "
        "mov.b32 z, 0; "
        "shl.b32 x, $16, 1; mov.b32 c, $18; "
        "and.b32 x, x, 0x06060606; lop3.b32 v, c, 0x01010101, x, 0xEA; "
        "shr.b32 t, v, 4; or.b32 t, t, v; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $19, $23, sel; prmt.b32 hi, $27, $31, sel; "
        "prmt.b32 $0, lo, hi, 0x5140; prmt.b32 $1, lo, hi, 0x7362; "
        "shl.b32 x, $17, 1; shr.b32 c, $18, 1; "
        "and.b32 x, x, 0x06060606; lop3.b32 v, c, 0x01010101, x, 0xEA; "
        "shr.b32 t, v, 4; or.b32 t, t, v; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $19, $23, sel; prmt.b32 hi, $27, $31, sel; "
        "prmt.b32 $2, lo, hi, 0x5140; prmt.b32 $3, lo, hi, 0x7362; "
        "shr.b32 x, $16, 1; shr.b32 c, $18, 2; "
        "and.b32 x, x, 0x06060606; lop3.b32 v, c, 0x01010101, x, 0xEA; "
        "shr.b32 t, v, 4; or.b32 t, t, v; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $19, $23, sel; prmt.b32 hi, $27, $31, sel; "
        "prmt.b32 $4, lo, hi, 0x5140; prmt.b32 $5, lo, hi, 0x7362; "
        "shr.b32 x, $17, 1; shr.b32 c, $18, 3; "
        "and.b32 x, x, 0x06060606; lop3.b32 v, c, 0x01010101, x, 0xEA; "
        "shr.b32 t, v, 4; or.b32 t, t, v; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $19, $23, sel; prmt.b32 hi, $27, $31, sel; "
        "prmt.b32 $6, lo, hi, 0x5140; prmt.b32 $7, lo, hi, 0x7362; "
        "shr.b32 x, $16, 3; shr.b32 c, $18, 4; "
        "and.b32 x, x, 0x06060606; lop3.b32 v, c, 0x01010101, x, 0xEA; "
        "shr.b32 t, v, 4; or.b32 t, t, v; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $19, $23, sel; prmt.b32 hi, $27, $31, sel; "
        "prmt.b32 $8, lo, hi, 0x5140; prmt.b32 $9, lo, hi, 0x7362; "
        "shr.b32 x, $17, 3; shr.b32 c, $18, 5; "
        "and.b32 x, x, 0x06060606; lop3.b32 v, c, 0x01010101, x, 0xEA; "
        "shr.b32 t, v, 4; or.b32 t, t, v; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $19, $23, sel; prmt.b32 hi, $27, $31, sel; "
        "prmt.b32 $10, lo, hi, 0x5140; prmt.b32 $11, lo, hi, 0x7362; "
        "shr.b32 x, $16, 5; shr.b32 c, $18, 6; "
        "and.b32 x, x, 0x06060606; lop3.b32 v, c, 0x01010101, x, 0xEA; "
        "shr.b32 t, v, 4; or.b32 t, t, v; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $19, $23, sel; prmt.b32 hi, $27, $31, sel; "
        "prmt.b32 $12, lo, hi, 0x5140; prmt.b32 $13, lo, hi, 0x7362; "
        "shr.b32 x, $17, 5; shr.b32 c, $18, 7; "
        "and.b32 x, x, 0x06060606; lop3.b32 v, c, 0x01010101, x, 0xEA; "
        "shr.b32 t, v, 4; or.b32 t, t, v; prmt.b32 sel, t, z, 0x4420; "
        "prmt.b32 lo, $19, $23, sel; prmt.b32 hi, $27, $31, sel; "
        "prmt.b32 $14, lo, hi, 0x5140; prmt.b32 $15, lo, hi, 0x7362; "
        "} ",
        "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        [a, b, c, tl.load(tab_ptr), tl.load(tab_ptr + 1), tl.load(tab_ptr + 2),
         tl.load(tab_ptr + 3)],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
               tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _interleave4(s0, s1, s2, s3):
    """Four segments [N, K] -> [N, 4 * K], column k * 4 + f from segment f."""
    return _flat(tl.join(tl.join(s0, s2), tl.join(s1, s3)))


@triton.jit
def _interleave8(s0, s1, s2, s3, s4, s5, s6, s7):
    """Eight segments [N, K] -> [N, 8 * K], column k * 8 + f from segment f."""
    return _flat(tl.join(tl.join(tl.join(s0, s4), tl.join(s2, s6)),
                         tl.join(tl.join(s1, s5), tl.join(s3, s7))))


@triton.jit
def decode_tile(row_ptr, key_ok, cent_ptr, W0: tl.constexpr, W1: tl.constexpr,
                W2: tl.constexpr, NSEG: tl.constexpr, SEGLEN: tl.constexpr,
                SEG_PAD: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr,
                MODE: tl.constexpr):
    """Decoded values [BLOCK_N, SEG_PAD * NSEG] of packed rows, column order of `tile_coords`.

    row_ptr: uint8 pointers [BLOCK_N, 1] to each row's first packed byte; key_ok: bool
    [BLOCK_N] rows to read. MODE TABLE: cent_ptr[code] (table dtype); MODE SIGNS: +-1.0;
    MODE BYTES: cent_ptr is `byte_table` (single-plane codes only). GPU-only modes (inline
    PTX; the interpreter cannot run them), fp16 values: PLANES3 (3-bit codes) and PAIRS
    (2-bit codes), cent_ptr a `permute_table`; SIGN_BITS, +-1.0. (4-bit codes: `nibble_halves`.)
    Padded columns and masked rows hold the value of code 0 (callers zero their partners).
    """
    k = tl.arange(0, SEG_PAD)
    mask = key_ok[:, None] & (k < SEGLEN)[None, :]
    if MODE == PAIRS:  # 2 bits: NSEG == 4 and one byte holds all 4 segments
        s0, s1, s2, s3 = _two_bit_values(tl.load(row_ptr + k[None, :], mask=mask, other=0),
                                         cent_ptr)
        out = _interleave4(s0, s1, s2, s3)
    elif MODE == PLANES3:  # 3 bits: planes 2 + 1, NSEG == 8
        s0, s1, s2, s3, s4, s5, s6, s7 = _three_bit_values(
            tl.load(row_ptr + k[None, :], mask=mask, other=0),
            tl.load(row_ptr + SEGLEN + k[None, :], mask=mask, other=0),
            tl.load(row_ptr + OFF1 + k[None, :], mask=mask, other=0), cent_ptr)
        out = _interleave8(s0, s1, s2, s3, s4, s5, s6, s7)
    elif MODE == SIGN_BITS:  # one byte holds all 8 segments
        s0, s1, s2, s3, s4, s5, s6, s7 = _sign_values(
            tl.load(row_ptr + k[None, :], mask=mask, other=0))
        out = _interleave8(s0, s1, s2, s3, s4, s5, s6, s7)
    elif NSEG == 1:
        out = _segment(row_ptr, mask, k, cent_ptr, 0, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE)
    elif NSEG == 2:
        out = _flat(tl.join(
            _segment(row_ptr, mask, k, cent_ptr, 0, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 1, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE)))
    elif NSEG == 4:
        out = _interleave4(
            _segment(row_ptr, mask, k, cent_ptr, 0, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 1, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 2, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 3, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE))
    else:
        out = _interleave8(
            _segment(row_ptr, mask, k, cent_ptr, 0, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 1, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 2, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 3, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 4, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 5, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 6, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE),
            _segment(row_ptr, mask, k, cent_ptr, 7, W0, W1, W2, NSEG, SEGLEN, OFF1, OFF2, MODE))
    return out


@triton.jit
def operand(tile, key_ok, ROWS: tl.constexpr):
    """A decoded tile ready to feed tl.dot with ROWS rows on the other side.

    For ROWS >= 64 (Hopper wgmma) rows past the end are zeroed with a select: without an op
    between join/reshape and the dot, Triton 3.6's OptimizeDotOperands pass crashes. The
    select costs one instruction per element, so smaller (mma v2) dots skip it.
    """
    if ROWS >= 64:
        tile = tl.where(key_ok[:, None], tile, 0.0)
    return tile


@triton.jit
def key_logits(q, sq, idx_rows, sign_rows, key_ok, gamma, cent_ptr,
               K_W0: tl.constexpr, K_W1: tl.constexpr, K_W2: tl.constexpr,
               K_NSEG: tl.constexpr, K_SEGLEN: tl.constexpr, K_SEG_PAD: tl.constexpr,
               K_OFF1: tl.constexpr, K_OFF2: tl.constexpr, S_NSEG: tl.constexpr,
               S_SEGLEN: tl.constexpr, S_SEG_PAD: tl.constexpr, HAS_QJL: tl.constexpr,
               K_MODE: tl.constexpr, S_MODE: tl.constexpr, PRECISION: tl.constexpr):
    """Key estimates [BLOCK_M, BLOCK_N] float32 before the key norm: <q, c[idx]> (+ QJL term).

    q: rotated queries [BLOCK_M, K tile width] in key tile column order (zero in padded
    columns), in the dot dtype; sq: sketch queries S q * sqrt(pi/2)/m in sign tile order;
    gamma: residual norms [BLOCK_N] float32; K_MODE: a `decode_tile` mode (cent_ptr to
    match); S_MODE: SIGNS or SIGN_BITS. Keys are decoded in registers, never stored.
    """
    keys = decode_tile(idx_rows, key_ok, cent_ptr, K_W0, K_W1, K_W2, K_NSEG, K_SEGLEN,
                       K_SEG_PAD, K_OFF1, K_OFF2, K_MODE)
    keys = operand(keys, key_ok, q.shape[0]).to(q.dtype)
    s = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
    if HAS_QJL:
        s += qjl_logits(sq, sign_rows, key_ok, gamma, S_NSEG, S_SEGLEN, S_SEG_PAD, S_MODE,
                        PRECISION)
    return s


@triton.jit
def qjl_logits(sq, sign_rows, key_ok, gamma, S_NSEG: tl.constexpr, S_SEGLEN: tl.constexpr,
               S_SEG_PAD: tl.constexpr, S_MODE: tl.constexpr, PRECISION: tl.constexpr):
    """QJL term [BLOCK_M, BLOCK_N] float32: gamma * <sq, s> (arguments as in key_logits)."""
    signs = decode_tile(sign_rows, key_ok, sign_rows, 1, 0, 0, S_NSEG, S_SEGLEN, S_SEG_PAD, 0, 0,
                        S_MODE)
    signs = operand(signs, key_ok, sq.shape[0]).to(sq.dtype)
    return tl.dot(sq, tl.trans(signs), input_precision=PRECISION) * gamma[None, :]
