"""The PTX that decodes 4-bit codes on the GPU (NIBBLES mode in tq_ops/kernels/codes.py),
executed by a small emulator of its instructions (prmt, lop3, shifts) against a plain table
lookup. CI has no GPU and the Triton interpreter cannot run inline PTX, so this is where a
wrong selector or truth table fails."""

import ast
import inspect
import re

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_ops.codebook import lloyd_max
from tq_ops.kernels import codes

MASK = 0xFFFFFFFF


def nibble_asm() -> str:
    """The PTX string literal passed to tl.inline_asm_elementwise in decode_tile."""
    tree = ast.parse(inspect.getsource(codes.decode_tile.fn))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", "") == "inline_asm_elementwise"]
    assert len(calls) == 1
    return ast.literal_eval(calls[0].args[0])


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
        result = {"and.b32": lambda x, y: x & y, "shl.b32": lambda x, y: (x << y) & MASK,
                  "shr.b32": lambda x, y: x >> y, "prmt.b32": prmt, "lop3.b32": lop3}[op](*args)
        if dst.startswith("$"):
            operands[int(dst[1:])] = result
        else:
            regs[dst] = result
    return operands


def lookup(centroids: torch.Tensor, packed: list[int]) -> tuple[list[int], list[int]]:
    """(fp16 bit patterns the PTX returns for the low nibbles, for the high nibbles)."""
    operands = {4: sum(b << 8 * i for i, b in enumerate(packed))}
    for i, word in enumerate(codes.nibble_table(centroids).tolist()):
        operands.update({5 + 4 * i + j: word & MASK for j in range(4)})  # pack=4: 4 copies
    out = execute(nibble_asm(), operands)
    lanes = [out[r] >> shift & 0xFFFF for r in range(4) for shift in (0, 16)]
    return lanes[:4], lanes[4:]


def fp16_bits(centroids: torch.Tensor) -> list[int]:
    return (centroids.half().view(torch.int16).numpy().astype(np.int64) & 0xFFFF).tolist()


def test_nibble_asm_matches_table_lookup():
    rng = np.random.default_rng(0)
    for dim in (64, 128):
        centroids = lloyd_max(dim, 4).float()
        half = fp16_bits(centroids)
        for _ in range(300):
            packed = rng.integers(0, 256, 4).tolist()
            low, high = lookup(centroids, packed)
            assert low == [half[b & 15] for b in packed]
            assert high == [half[b >> 4] for b in packed]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-65504, 65504, width=16), min_size=16, max_size=16),
       st.lists(st.integers(0, 255), min_size=4, max_size=4))
def test_nibble_asm_is_a_plain_lookup_for_any_table(values, packed):
    """Any 16 fp16 values (unsorted, asymmetric, signed zeros, subnormals): a table lookup."""
    centroids = torch.tensor(values, dtype=torch.float32)
    half = fp16_bits(centroids)
    low, high = lookup(centroids, packed)
    assert low == [half[b & 15] for b in packed]
    assert high == [half[b >> 4] for b in packed]


def test_nibble_table_layout():
    """Word w holds bytes of entries 4w .. 4w + 3, little-endian; low bytes, then high bytes."""
    centroids = torch.linspace(-1, 1, 16)
    words = codes.nibble_table(centroids).numpy().astype(np.int64) & MASK
    raw = b"".join(int(w).to_bytes(4, "little") for w in words)
    half = centroids.half().view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    assert list(raw[:16]) == [h & 0xFF for h in half]
    assert list(raw[16:]) == [h >> 8 for h in half]
