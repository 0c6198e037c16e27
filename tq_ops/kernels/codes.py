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

import triton
import triton.language as tl

from ..packing import plane_widths
from .common import int_cache, next_pow2
from .ptx import nibble_values, sign_segment, three_bit_values, two_bit_values

TABLE = tl.constexpr(0)  # decode_tile MODE: codes -> centroids (fp32 gathers)
SIGNS = tl.constexpr(1)  # decode_tile MODE: 1-bit codes -> QJL signs +-1.0
SIGN_BITS = tl.constexpr(4)  # qjl_logits MODE: QJL sign bits -> fp16 +-1.0, one PTX per segment
PLANES3 = tl.constexpr(5)  # decode_tile MODE: 3-bit codes (2 + 1 planes) -> fp16 by byte permutes
PAIRS = tl.constexpr(6)  # decode_tile MODE: 2-bit codes (one plane) -> fp16 by byte permutes


@int_cache
def plane_layout(dim: int, bits: int) -> dict:
    """Constexpr description of `dim` codes of `bits` bits (bits = 1 also describes signs);
    cached (host time per launch): read it, do not modify it.

    W0..W2: plane widths (0 = absent); NSEG, SEGLEN, SEG_PAD: finest segments, their
    length and its power-of-two padding; OFF1, OFF2: byte offsets of planes 1 and 2.
    """
    widths = list(plane_widths(bits)) if bits > 0 else []
    nseg = 8 // min(widths) if widths else 1
    if dim % nseg:
        raise ValueError(f"the CUDA kernels need head_dim (or qjl_dim) divisible by {nseg} "
                         f"for {bits}-bit codes, got {dim}")
    if next_pow2(dim // nseg) * nseg < 16:
        raise ValueError(f"the CUDA kernels need head_dim (or qjl_dim) >= 16, got {dim}")
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + dim * w // 8)
    widths += [0] * (3 - len(widths))
    offsets += [0] * (4 - len(offsets))
    return dict(W0=widths[0], W1=widths[1], W2=widths[2], NSEG=nseg, SEGLEN=dim // nseg,
                SEG_PAD=next_pow2(dim // nseg), OFF1=offsets[1], OFF2=offsets[2])


def prefixed(prefix: str, layout: dict) -> dict:
    """The same layout with every key prefixed (e.g. K_W0), for kernels reading K and V."""
    return {prefix + key: value for key, value in layout.items()}


@int_cache
def sign_layout(qjl_dim: int) -> dict:
    """S_NSEG, S_SEGLEN, S_SEG_PAD of a plane of `qjl_dim` QJL signs (`plane_layout` of 1-bit
    codes): all a kernel reads of it, since one plane has no widths or offsets to choose."""
    layout = plane_layout(qjl_dim, 1)
    return {f"S_{key}": layout[key] for key in ("NSEG", "SEGLEN", "SEG_PAD")}


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


@triton.jit
def nibble_halves(row_ptr, key_ok, cent_ptr, words, SEGLEN: tl.constexpr,
                  SEG_PAD: tl.constexpr, PTX: tl.constexpr):
    """4-bit codes of packed rows as two tiles [BLOCK_N, SEG_PAD]: coordinates k and
    SEGLEN + k (low and high nibble of byte k). PTX: decode by `ptx.nibble_values` with `words`,
    the `table_words` of the upper half of a table symmetric about 0, else gather the fp32
    centroids at cent_ptr (all 16; any codebook; the interpreter). Padded columns and
    masked rows hold the value of code 0 (callers zero their partners)."""
    k = tl.arange(0, SEG_PAD)
    byte = tl.load(row_ptr + k[None, :], mask=key_ok[:, None] & (k < SEGLEN)[None, :], other=0)
    if PTX:
        lo, hi = nibble_values(byte, words)
    else:
        lo = tl.load(cent_ptr + (byte & 15).to(tl.int32))
        hi = tl.load(cent_ptr + (byte >> 4).to(tl.int32))
    return lo, hi


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
def decode_tile(row_ptr, key_ok, cent_ptr, words, W0: tl.constexpr, W1: tl.constexpr,
                W2: tl.constexpr, NSEG: tl.constexpr, SEGLEN: tl.constexpr,
                SEG_PAD: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr,
                MODE: tl.constexpr):
    """Decoded values [BLOCK_N, SEG_PAD * NSEG] of packed rows, column order of `tile_coords`.

    row_ptr: uint8 pointers [BLOCK_N, 1] to each row's first packed byte; key_ok: bool
    [BLOCK_N] rows to read. MODE TABLE: cent_ptr[code] (fp32 centroids); MODE SIGNS: +-1.0.
    GPU-only modes (inline PTX; the interpreter cannot run them), fp16 values: PLANES3 (3-bit
    codes) and PAIRS (2-bit codes) from `words`, the centroids' `table_words` (None for the
    other modes). (4-bit codes: `nibble_halves`; GPU QJL signs: `qjl_logits`.)
    Padded columns and masked rows hold the value of code 0 (callers zero their partners).
    """
    k = tl.arange(0, SEG_PAD)
    mask = key_ok[:, None] & (k < SEGLEN)[None, :]
    if MODE == PAIRS:  # 2 bits: NSEG == 4 and one byte holds all 4 segments
        s0, s1, s2, s3 = two_bit_values(tl.load(row_ptr + k[None, :], mask=mask, other=0),
                                         words)
        out = _interleave4(s0, s1, s2, s3)
    elif MODE == PLANES3:  # 3 bits: planes 2 + 1, NSEG == 8
        s0, s1, s2, s3, s4, s5, s6, s7 = three_bit_values(
            tl.load(row_ptr + k[None, :], mask=mask, other=0),
            tl.load(row_ptr + SEGLEN + k[None, :], mask=mask, other=0),
            tl.load(row_ptr + OFF1 + k[None, :], mask=mask, other=0), words)
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
def key_logits(q, sq, idx_rows, sign_rows, key_ok, gamma, cent_ptr, words,
               K_W0: tl.constexpr, K_W1: tl.constexpr, K_W2: tl.constexpr,
               K_NSEG: tl.constexpr, K_SEGLEN: tl.constexpr, K_SEG_PAD: tl.constexpr,
               K_OFF1: tl.constexpr, K_OFF2: tl.constexpr, S_NSEG: tl.constexpr,
               S_SEGLEN: tl.constexpr, S_SEG_PAD: tl.constexpr, HAS_QJL: tl.constexpr,
               K_MODE: tl.constexpr, S_MODE: tl.constexpr, PRECISION: tl.constexpr):
    """Key estimates [BLOCK_N, BLOCK_M] float32 before the key norm: <c[idx], q> (+ QJL term).

    q: rotated queries, transposed [K tile width, BLOCK_M], rows in key tile column order
    (zero in padded ones), in the dot dtype; sq: sketch queries S q * sqrt(pi/2)/m,
    transposed, in sign tile order; gamma: residual norms [BLOCK_N] float32; K_MODE: a
    `decode_tile` mode (cent_ptr, words to match); S_MODE: SIGNS or SIGN_BITS. Keys are the
    dots' first operand and are decoded in registers, never stored.
    """
    keys = decode_tile(idx_rows, key_ok, cent_ptr, words, K_W0, K_W1, K_W2, K_NSEG, K_SEGLEN,
                       K_SEG_PAD, K_OFF1, K_OFF2, K_MODE)
    s = tl.dot(keys.to(q.dtype), q, input_precision=PRECISION)
    if HAS_QJL:
        s += qjl_logits(sq, sign_rows, key_ok, gamma, S_NSEG, S_SEGLEN, S_SEG_PAD, S_MODE,
                        PRECISION)
    return s


@triton.jit
def qjl_logits(sq, sign_rows, key_ok, gamma, S_NSEG: tl.constexpr, S_SEGLEN: tl.constexpr,
               S_SEG_PAD: tl.constexpr, S_MODE: tl.constexpr, PRECISION: tl.constexpr):
    """QJL term [BLOCK_N, BLOCK_M] float32: gamma * <s, sq> (arguments as in key_logits).

    S_MODE SIGN_BITS (GPU): sq is a tuple of the 8 segments [S_SEG_PAD, BLOCK_M] (`segments`)
    and each segment of the packed signs is decoded by `sign_segment` for its own dot."""
    if S_MODE == SIGN_BITS:
        WIDTH: tl.constexpr = max(16, S_SEG_PAD)  # tl.dot needs 16 columns
        k = tl.arange(0, WIDTH)
        byte = tl.load(sign_rows + k[None, :], mask=key_ok[:, None] & (k < S_SEGLEN)[None, :],
                       other=0)
        acc = tl.dot(sign_segment(byte, 0), sq[0], input_precision=PRECISION)
        for f in tl.static_range(1, 8):
            acc = tl.dot(sign_segment(byte, f), sq[f], acc, input_precision=PRECISION)
    else:
        signs = decode_tile(sign_rows, key_ok, sign_rows, None, 1, 0, 0, S_NSEG, S_SEGLEN,
                            S_SEG_PAD, 0, 0, S_MODE)
        acc = tl.dot(signs.to(sq.dtype), sq, input_precision=PRECISION)
    return acc * gamma[:, None]


@triton.jit
def segments(ptr, rows, row_ok, WIDTH: tl.constexpr, SEGLEN: tl.constexpr,
             SEG_PAD: tl.constexpr):
    """The 8 segments [max(16, SEG_PAD), len(rows)] of rows of WIDTH values at ptr,
    transposed: segment f holds coordinates f * SEGLEN + k (zero past SEGLEN), a tuple (the
    other dot operands of `qjl_logits`' SIGN_BITS mode; tl.dot needs 16 columns)."""
    PAD: tl.constexpr = max(16, SEG_PAD)
    k = tl.arange(0, PAD)
    out = ()
    for f in tl.static_range(8):
        out = out + (tl.load(ptr + rows[None, :] * WIDTH + (f * SEGLEN + k)[:, None],
                             mask=row_ok[None, :] & (k < SEGLEN)[:, None], other=0.0),)
    return out
