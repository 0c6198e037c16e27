"""The PTX that decodes codes on the GPU (tq_ops/kernels/ptx.py: `NIBBLE_PTX`, `PAIRS_PTX`,
`PLANES3_PTX`, `SIGN_SEGMENT_PTX`), executed by a small emulator of its instructions (prmt,
lop3, shifts) against plain table lookups and the storage format; and the in-kernel table
words it reads (`table_words`, from a whole table or a symmetric one's upper half), run by the Triton interpreter. CI has no
GPU and the interpreter cannot run inline PTX, so this is where a wrong selector, shift or
truth table fails."""

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_ops.codebook import full_table, half_table, lloyd_max
from tq_ops.kernels import ptx
from tq_ops.packing import pack

MASK = 0xFFFFFFFF


def permute_table(centroids: torch.Tensor) -> list[int]:
    """The words `table_words` must build (oracle): the low bytes, then the high bytes, of the
    fp16 centroids, entry i in byte i % 4 of word i // 4 (little-endian), as uint32."""
    half = fp16_bits(centroids)
    lanes = [h & 0xFF for h in half] + [h >> 8 for h in half]
    return [sum(lanes[4 * w + j] << 8 * j for j in range(4)) for w in range(len(lanes) // 4)]


def prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 default mode: byte i of the result is byte (sel nibble i & 7) of {b, a};
    nibble bit 3 replicates that byte's sign bit instead."""
    pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> 4 * i) & 0xF
        byte = pool[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX lop3.b32: bit k of the result is bit (a_k * 4 + b_k * 2 + c_k) of lut."""
    return sum(((lut >> (((a >> k) & 1) * 4 + ((b >> k) & 1) * 2 + ((c >> k) & 1))) & 1) << k
               for k in range(32))


def execute(asm: str, operands: dict[int, int]) -> dict[int, int]:
    """Run the asm's instructions on 32-bit operands ($n) and named temporaries."""
    regs: dict[str, int] = {}

    def value(token: str) -> int:
        if token.startswith("$"):
            return operands[int(token[1:])]
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", token):
            return int(token, 0)
        return regs[token]

    for stmt in asm.strip("{} ").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg") or stmt in "{}":
            continue
        op, rest = stmt.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        args = [value(t) for t in src]
        result = {"and.b32": lambda x, y: x & y, "or.b32": lambda x, y: x | y,
                  "mov.b32": lambda x: x, "shl.b32": lambda x, y: (x << y) & MASK,
                  "shr.b32": lambda x, y: x >> y, "sub.u32": lambda x, y: (x - y) & MASK,
                  "prmt.b32": prmt, "lop3.b32": lop3}[op](*args)
        if dst.startswith("$"):
            operands[int(dst[1:])] = result
        else:
            regs[dst] = result
    return operands


def run(asm: str, outputs: int, inputs: list[list[int]], centroids=None) -> list[int]:
    """Execute a decoder's PTX for one pack of 4 elements: operands $0 .. $outputs-1 are the
    outputs, then one register per input (its 4 bytes), then each `permute_table` word 4
    times (pack=4 repeats scalars). Returns the outputs' 16-bit lanes in element order."""
    operands = {outputs + i: sum(x << 8 * j for j, x in enumerate(packed))
                for i, packed in enumerate(inputs)}
    if centroids is not None:
        base = outputs + len(inputs)
        for i, word in enumerate(permute_table(centroids)):
            operands.update({base + 4 * i + j: word for j in range(4)})
    out = execute(asm, operands)
    return [out[r] >> shift & 0xFFFF for r in range(outputs) for shift in (0, 16)]


def lookup(centroids: torch.Tensor, packed: list[int]) -> tuple[list[int], list[int]]:
    """(fp16 bit patterns `NIBBLE_PTX` returns for the low nibbles, for the high nibbles) of 4
    packed bytes, given the `table_words` of the upper half of the centroids."""
    words = permute_table(centroids[8:])
    operands = {4: sum(x << 8 * j for j, x in enumerate(packed))}
    for i, word in enumerate(words):  # pack=4 repeats each scalar 4 times
        operands.update({5 + 4 * i + j: word for j in range(4)})
    out = execute(ptx.NIBBLE_PTX.value, operands)
    lanes = [out[r] >> shift & 0xFFFF for r in range(4) for shift in (0, 16)]
    return lanes[:4], lanes[4:]


def fp16_tables(size: int):
    """Any `size` finite fp16 values: unsorted, asymmetric, signed zeros, subnormals."""
    return st.lists(st.floats(-65504, 65504, width=16), min_size=size, max_size=size)


def byte_lists(size: int):
    return st.lists(st.integers(0, 255), min_size=size, max_size=size)


def fp16_bits(centroids: torch.Tensor) -> list[int]:
    return (centroids.half().view(torch.int16).numpy().astype(np.int64) & 0xFFFF).tolist()


def test_nibble_ptx_matches_table_lookup():
    rng = np.random.default_rng(0)
    for dim in (64, 80, 96, 128, 256):
        centroids = lloyd_max(dim, 4).float()
        half = fp16_bits(centroids)
        for _ in range(300):
            packed = rng.integers(0, 256, 4).tolist()
            low, high = lookup(centroids, packed)
            assert low == [half[b & 15] for b in packed]
            assert high == [half[b >> 4] for b in packed]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 65504, width=16, exclude_min=True), min_size=8, max_size=8),
       byte_lists(4))
def test_nibble_ptx_is_a_plain_lookup_for_any_symmetric_table(upper, packed):
    """Any 8 positive fp16 values (unsorted, subnormals) mirrored into a 16-entry table."""
    magnitudes = torch.tensor(upper, dtype=torch.float32)
    centroids = torch.cat([-magnitudes.flip(0), magnitudes])
    half = fp16_bits(centroids)
    low, high = lookup(centroids, packed)
    assert low == [half[b & 15] for b in packed]
    assert high == [half[b >> 4] for b in packed]


@triton.jit
def _table_probe(cent_ptr, words_ptr, N: tl.constexpr, HALF: tl.constexpr):
    words = ptx.table_words(cent_ptr, N, HALF)
    for i in tl.static_range(N // 2):
        tl.store(words_ptr + i, words[i])


def table_probe(centroids: torch.Tensor, n: int) -> list[int]:
    """`table_words` of n fp32 centroids (or, given n // 2, of the symmetric table whose upper
    half they are), computed by the kernel helper."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter runs it
    words = torch.zeros(n // 2, dtype=torch.int32, device=device)
    _table_probe[(1,)](centroids.to(device), words, N=n, HALF=len(centroids) < n)
    return [w & MASK for w in words.tolist()]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([4, 8, 16]).flatmap(fp16_tables))
def test_table_words_match_the_layout(values):
    centroids = torch.tensor(values, dtype=torch.float32)
    assert table_probe(centroids, len(values)) == permute_table(centroids)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([4, 8, 16]).flatmap(fp16_tables))
def test_table_words_of_an_upper_half_are_those_of_the_mirrored_table(values):
    """The kernels take a symmetric codebook as its upper half (`codebook.half_table`)."""
    upper = torch.tensor(values[len(values) // 2:], dtype=torch.float32).abs()
    bits = len(values).bit_length() - 1
    assert table_probe(upper, len(values)) == permute_table(full_table(upper, bits))
    for dim in (64, 128):
        table = lloyd_max(dim, 3).float()
        assert table_probe(half_table(table), 8) == permute_table(table)


def test_permute_table_layout():
    """Word w holds bytes of entries 4w .. 4w + 3, little-endian; low bytes, then high bytes."""
    centroids = torch.linspace(-1, 1, 16)
    raw = b"".join(int(w).to_bytes(4, "little") for w in permute_table(centroids))
    half = fp16_bits(centroids)
    assert list(raw[:16]) == [h & 0xFF for h in half]
    assert list(raw[16:]) == [h >> 8 for h in half]


def three_bit_lookup(centroids: torch.Tensor, a: list[int], b: list[int], c: list[int]):
    """Segment f -> the 4 fp16 bit patterns the PTX returns for 4 packed columns."""
    lanes = run(ptx.PLANES3_PTX.value, 16, [a, b, c], centroids)
    return [lanes[4 * f:4 * f + 4] for f in range(8)]


@settings(max_examples=200, deadline=None)
@given(fp16_tables(8), byte_lists(12))
def test_three_bit_asm_is_a_plain_lookup(values, raw):
    """Segment f, column j: code = (2-bit field f // 2 of a (f even) or b) * 2 + bit f of c."""
    centroids = torch.tensor(values, dtype=torch.float32)
    half = fp16_bits(centroids)
    a, b, c = raw[:4], raw[4:8], raw[8:]
    got = three_bit_lookup(centroids, a, b, c)
    for f in range(8):
        field = [((a if f % 2 == 0 else b)[j] >> 2 * (f // 2)) & 3 for j in range(4)]
        assert got[f] == [half[field[j] * 2 + (c[j] >> f & 1)] for j in range(4)]


def test_three_bit_asm_decodes_the_packed_layout():
    """Codes packed by tq_ops.packing (d = 128: planes of 32 + 16 bytes) come back in
    segment f, column k = coordinate 16 f + k, as decode_tile feeds them to the PTX."""
    gen = torch.Generator().manual_seed(0)
    centroids = lloyd_max(128, 3).float()
    half = fp16_bits(centroids)
    for _ in range(20):
        code = torch.randint(0, 8, (128,), generator=gen)
        packed = pack(code, 3).tolist()
        for k0 in range(0, 16, 4):  # 4 packed columns per PTX call
            cols = range(k0, k0 + 4)
            got = three_bit_lookup(centroids, [packed[k] for k in cols],
                                   [packed[16 + k] for k in cols], [packed[32 + k] for k in cols])
            for f in range(8):
                assert got[f] == [half[int(code[16 * f + k])] for k in cols]


@settings(max_examples=200, deadline=None)
@given(fp16_tables(4), byte_lists(4))
def test_two_bit_asm_is_a_plain_lookup(values, packed):
    """Segment f, column j: code = bits 2f, 2f + 1 of byte j."""
    centroids = torch.tensor(values, dtype=torch.float32)
    half = fp16_bits(centroids)
    lanes = run(ptx.PAIRS_PTX.value, 8, [packed], centroids)
    for f in range(4):
        assert lanes[4 * f:4 * f + 4] == [half[x >> 2 * f & 3] for x in packed]


def test_two_bit_asm_decodes_the_packed_layout():
    """2-bit codes packed by tq_ops.packing (d = 128: byte k holds coordinates k + 32 f)."""
    gen = torch.Generator().manual_seed(1)
    centroids = lloyd_max(128, 2).float()
    half = fp16_bits(centroids)
    code = torch.randint(0, 4, (128,), generator=gen)
    packed = pack(code, 2).tolist()
    for k0 in range(0, 32, 4):
        cols = range(k0, k0 + 4)
        lanes = run(ptx.PAIRS_PTX.value, 8, [[packed[k] for k in cols]], centroids)
        for f in range(4):
            assert lanes[4 * f:4 * f + 4] == [half[int(code[32 * f + k])] for k in cols]


@pytest.mark.parametrize("asm,constraints,outputs,operands", [
    (ptx.PAIRS_PTX, ptx.PAIRS_CONSTRAINTS, 8, 1 + 2 * 4),  # a byte, 2 table words x pack 4
    (ptx.PLANES3_PTX, ptx.PLANES3_CONSTRAINTS, 16, 3 + 4 * 4)])  # 3 bytes, 4 words x pack 4
def test_permute_decoder_constraints_match_their_operands(asm, constraints, outputs,
                                                          operands):
    """The asm writes each output register ($0 ..) once and reads only input registers, and
    its constraint string lists as many outputs ("=r") and inputs ("r") as the call passes (a
    mismatch only the GPU build would catch otherwise)."""
    written = re.findall(r"prmt\.b32 \$(\d+),", asm.value)
    read = {int(n) for n in re.findall(r"\$(\d+)", asm.value)} - {int(n) for n in written}
    assert sorted(map(int, written)) == list(range(outputs))
    assert read <= set(range(outputs, outputs + operands))
    assert constraints.value.split(",") == ["=r"] * outputs + ["r"] * operands


def test_sign_segment_ptx_matches_bits():
    """Segment f: bit f of each byte -> +1.0 (0x3C00) where set, -1.0 (0xBC00) where clear."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        packed = rng.integers(0, 256, 4).tolist()
        word = sum(x << 8 * j for j, x in enumerate(packed))
        for f in range(8):
            out = execute(ptx.SIGN_SEGMENT_PTX.value[f], {2: word})
            lanes = [out[r] >> shift & 0xFFFF for r in (0, 1) for shift in (0, 16)]
            assert lanes == [0x3C00 if x >> f & 1 else 0xBC00 for x in packed]
