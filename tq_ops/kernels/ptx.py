"""Inline-PTX decoders of packed codes and QJL signs, and the codebook tables they read.

GPU only: the Triton interpreter cannot run inline PTX, so callers take their gather paths
there and tests/test_permute_asm.py executes these strings in an instruction emulator. Each
decoder takes packed bytes (pack=4: 4 bytes per 32-bit register) and returns fp16 values in
the layout of its input. Centroid lookups are byte permutes (prmt) from `table_words` held in
registers: no memory access.
"""

import triton
import triton.language as tl


@triton.jit
def _half_bits(cent_ptr, i: tl.constexpr):
    """fp16 bit pattern (int32, 0..0xFFFF) of fp32 centroid i."""
    return tl.load(cent_ptr + i).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _entry_bits(cent_ptr, i: tl.constexpr, N: tl.constexpr, HALF: tl.constexpr):
    """fp16 bits of entry i of an N-entry table at cent_ptr, or, HALF, of the symmetric table
    whose upper half (N // 2 entries) is at cent_ptr."""
    if not HALF:
        return _half_bits(cent_ptr, i)
    if i >= N // 2:
        return _half_bits(cent_ptr, i - N // 2)
    return _half_bits(cent_ptr, N // 2 - 1 - i) ^ 0x8000


@triton.jit
def table_words(cent_ptr, N: tl.constexpr, HALF: tl.constexpr = False):
    """The N (4, 8 or 16) fp32 centroids at cent_ptr (HALF: the N // 2 of the upper half of a
    symmetric table, mirrored) as byte-permute table words, int32 scalars: the low bytes, then
    the high bytes, of their fp16 values, entry i in byte i % 4 of word i // 4 (N // 2 words).
    Read once per program, before the key loop."""
    lo = ()
    hi = ()
    for w in tl.static_range(N // 4):
        h0 = _entry_bits(cent_ptr, 4 * w, N, HALF)
        h1 = _entry_bits(cent_ptr, 4 * w + 1, N, HALF)
        h2 = _entry_bits(cent_ptr, 4 * w + 2, N, HALF)
        h3 = _entry_bits(cent_ptr, 4 * w + 3, N, HALF)
        lo = lo + ((h0 & 0xFF) | (h1 & 0xFF) << 8 | (h2 & 0xFF) << 16 | (h3 & 0xFF) << 24,)
        hi = hi + ((h0 >> 8) | (h1 >> 8) << 8 | (h2 >> 8) << 16 | (h3 >> 8) << 24,)
    return lo + hi


# `nibble_values` PTX: 4 packed bytes ($4) -> fp16 centroids of their low nibbles ($0: bytes 0
# and 1, $1: bytes 2 and 3) and of their high nibbles ($2, $3), for a 16-entry table symmetric
# about 0 (c[15 - k] = -c[k]); $5, $9, $13, $17: the `table_words` of its upper half M = c[8:],
# non-negative (pack=4 repeats each).
# Code k reads M[k & 7] when bit 3 is set, else M[7 - k] with the sign bit set. One prmt
# selector takes the 4 codes of 2 bytes as they lie (no packing): bit 3 of each nibble
# becomes 7 in the positive nibbles (t - t >> 3) and an xnor makes the magnitude index; two
# prmt's per 4 codes look up low and high bytes, a prmt in sign-replicate mode turns bit 3
# into byte masks for the sign, two prmt's interleave: 18 instructions per 8 codes.
NIBBLE_PTX = tl.constexpr(
    "{ .reg .b32 t, u, idx, sb, w4, la, ha, lb, hb, sa, sg; "
    "and.b32 t, $4, 0x88888888; shr.b32 u, t, 3; sub.u32 u, t, u; "
    "lop3.b32 idx, $4, u, 0x77777777, 0x82; shr.b32 sb, idx, 16; "
    "prmt.b32 la, $5, $9, idx; prmt.b32 ha, $13, $17, idx; "
    "prmt.b32 lb, $5, $9, sb; prmt.b32 hb, $13, $17, sb; "
    "shl.b32 w4, $4, 4; "
    "prmt.b32 sa, w4, $4, 0xD9C8; lop3.b32 ha, ha, sa, 0x80808080, 0xF2; "
    "prmt.b32 sg, w4, $4, 0xFBEA; lop3.b32 hb, hb, sg, 0x80808080, 0xF2; "
    "prmt.b32 $0, la, ha, 0x6240; prmt.b32 $1, lb, hb, 0x6240; "
    "prmt.b32 $2, la, ha, 0x7351; prmt.b32 $3, lb, hb, 0x7351; }")


@triton.jit
def nibble_values(byte, words):
    """fp16 centroids of the low and high nibbles of uint8 `byte` (4-bit codes), two tensors;
    words: the 4 `table_words` of the non-negative upper half of a table symmetric about 0."""
    return tl.inline_asm_elementwise(
        NIBBLE_PTX, "=r,=r,=r,=r" + ",r" * 17, [byte, words[0], words[1], words[2], words[3]],
        dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


# `sign_segment` PTX for bit F of 4 packed bytes ($2) -> 4 fp16 signs ($0, $1): two prmt's
# move bytes 0, 1 / 2, 3 into the low byte of each 16-bit half; a shift by 15 - F puts bit F
# at both halves' sign positions and one lop3 makes (~bit) << 15 | 1.0 (+1.0 where set).
SIGN_SEGMENT_PTX = tl.constexpr(tuple(
    "{ .reg .b32 lo, hi, t, m, one; mov.b32 m, 0x80008000; mov.b32 one, 0x3C003C00; "
    "prmt.b32 lo, $2, 0, 0x4140; prmt.b32 hi, $2, 0, 0x4342; "
    f"shl.b32 t, lo, {15 - f}; lop3.b32 $0, t, m, one, 0xAE; "
    f"shl.b32 t, hi, {15 - f}; lop3.b32 $1, t, m, one, 0xAE; }}" for f in range(8)))


@triton.jit
def sign_segment(byte, F: tl.constexpr):
    """QJL signs +-1.0 (fp16) of bit F of each uint8 `byte` (any shape): one segment of a sign
    plane, decoded in whatever layout `byte` has (the dot's operand layout, when it feeds a
    dot), so no decoded tile goes through shared memory. 6 instructions per 4 signs."""
    return tl.inline_asm_elementwise(SIGN_SEGMENT_PTX[F], "=r,=r,r", [byte], dtype=tl.float16,
                                     is_pure=True, pack=4)


def _lookup(code: str, lo_words: str, hi_words: str, out: int) -> str:
    """PTX: the 4 codes (< 8) in the bytes of register `code` -> their fp16 table entries, as
    two packed pairs in $out and $out + 1. The codes are packed into prmt selector nibbles,
    then two prmt's look up the entries' low bytes (in `lo_words`) and high bytes (`hi_words`)
    and two interleave them: 7 instructions."""
    return (f"shr.b32 t, {code}, 4; or.b32 t, t, {code}; prmt.b32 sel, t, z, 0x4420; "
            f"prmt.b32 lo, {lo_words}, sel; prmt.b32 hi, {hi_words}, sel; "
            f"prmt.b32 ${out}, lo, hi, 0x5140; prmt.b32 ${out + 1}, lo, hi, 0x7362; ")


def _segment_codes(width: int, f: int) -> str:
    """PTX: the codes of finest segment f of 4 packed columns, one per byte of register x
    (2 bits) or v (3 bits). 2 bits ($8: the plane's bytes): field f of each byte to bits 0-1.
    3 bits ($16, $17: the 2-bit plane's byte runs of even and odd segments, $18: the 1-bit
    plane's): the 2-bit field f // 2 of $16 or $17 to bits 1-2, bit f of $18 to bit 0."""
    if width == 2 and f == 0:
        return "and.b32 x, $8, 0x03030303; "
    if width == 2:
        return f"shr.b32 x, $8, {2 * f}; and.b32 x, x, 0x03030303; "
    pairs = "$16" if f % 2 == 0 else "$17"
    high = f"shl.b32 x, {pairs}, 1; " if f < 2 else f"shr.b32 x, {pairs}, {f // 2 * 2 - 1}; "
    low = "mov.b32 c, $18; " if f == 0 else f"shr.b32 c, $18, {f}; "
    return high + low + "and.b32 x, x, 0x06060606; lop3.b32 v, c, 0x01010101, x, 0xEA; "


def _permute_decoder(width: int) -> str:
    """PTX of `two_bit_values` (width 2: 9 to 10 instructions per 4 codes) or
    `three_bit_values` (width 3: 11 per 4 codes): outputs $0 .. $(2 * segments - 1), two per
    finest segment; then the packed byte registers, then the `table_words` (pack=4 repeats
    each 4 times: low-byte words from $9 (2 bits) / $19 (3 bits), high-byte words after)."""
    if width == 2:
        segments, code, table, regs = 4, "x", ("$9, $9", "$13, $13"), "z, x, t, sel, lo, hi"
    else:
        segments, code, table, regs = 8, "v", ("$19, $23", "$27, $31"), "z, x, c, v, t, sel, lo, hi"
    body = "".join(_segment_codes(width, f) + _lookup(code, *table, 2 * f)
                   for f in range(segments))
    return "{ " + f".reg .b32 {regs}; " + "mov.b32 z, 0; " + body + "} "


def _constraints(outputs: int, inputs: int) -> str:
    return ",".join(["=r"] * outputs + ["r"] * inputs)


PAIRS_PTX = tl.constexpr(_permute_decoder(2))
PAIRS_CONSTRAINTS = tl.constexpr(_constraints(8, 1 + 2 * 4))
PLANES3_PTX = tl.constexpr(_permute_decoder(3))
PLANES3_CONSTRAINTS = tl.constexpr(_constraints(16, 3 + 4 * 4))


@triton.jit
def two_bit_values(byte, words):
    """fp16 centroids of the 4 segments of 2-bit codes in uint8 `byte` (PAIRS mode), four
    tensors; words: the 2 `table_words` of the 4 centroids."""
    return tl.inline_asm_elementwise(
        PAIRS_PTX, PAIRS_CONSTRAINTS, [byte, words[0], words[1]],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def three_bit_values(a, b, c, words):
    """fp16 centroids of the 8 segments of 3-bit codes (PLANES3 mode), eight tensors: uint8
    `a`, `b` are the 2-bit plane's two byte runs (segments 0, 2, 4, 6 and 1, 3, 5, 7), `c` the
    1-bit plane's; words: the 4 `table_words` of the 8 centroids."""
    return tl.inline_asm_elementwise(
        PLANES3_PTX, PLANES3_CONSTRAINTS, [a, b, c, words[0], words[1], words[2], words[3]],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
               tl.float16, tl.float16), is_pure=True, pack=4)
