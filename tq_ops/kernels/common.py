"""What every kernel family shares: the shapes the kernels take, the interpreter flag, launch
sizes, strides, and the fp16 hi/lo split of the tensor-core rotations.

Kernel families (compress, decompress, scores, attention) import this module, `codes`, `ptx`
and (the readers) `queries`, never each other or `reference`.
"""

import functools
import os

import torch
import triton
import triton.language as tl

# Whether the Triton interpreter runs the kernels (CPU tensors, no inline PTX). Read once, at
# import: set TRITON_INTERPRET before importing tq_ops, as Triton needs it before its kernels
# are defined (tests/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

INTERPRETER_SMS = 4  # multiprocessors `num_sms` reports for the interpreter: tests see key splits

ROT_SCALE = tl.constexpr(256.0)  # Pi^T, Pi S^T scaled by 2^8 before the split: no fp16 subnormals
UNIT_SCALE = tl.constexpr(4096.0)  # u and r_rot are scaled by 2^12 before the hi/lo split


def supports(dim: int, index_bits: int, qjl_dim: int | None = None, *,
             compress: bool = False) -> bool:
    """Whether the kernels take vectors of head_dim `dim` with `index_bits`-bit codes (and
    `qjl_dim` QJL signs): both dims multiples of 8 in [16, 256] (wider rows would not fit the
    kernels' registers and shared memory). `compress`: the compress kernels also need
    index_bits > 0; Triton 3.6 builds QJL-only keys with wrong sign bits for bf16 input on Hopper
    (tests/gpu/test_compress_cuda.py). Other shapes run the reference on the same device."""
    dims = (dim,) if qjl_dim is None else (dim, qjl_dim)
    return (index_bits > 0 or not compress) and all(d % 8 == 0 and 16 <= d <= 256 for d in dims)


def int_cache(fn):
    """Memoize a function of host ints (launch layouts: host time per eager launch); calls with
    a symbolic size (tracing with dynamic shapes) are computed, not cached."""
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def call(*args):
        return cached(*args) if all(type(a) is int or a is None for a in args) else fn(*args)
    return call


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (plain Python: host code; `triton.cdiv` costs a constexpr-function
    call, tens of microseconds per eager launch)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), plain Python like `cdiv`."""
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; `INTERPRETER_SMS` for the interpreter (CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def persistent_programs(device: torch.device) -> int:
    """Programs a persistent tile loop launches at most: two per SM; two when the interpreter
    runs on the CPU, so tests cover the tile loop (compress, decompress)."""
    return 2 * num_sms(device) if device.type == "cuda" else 2


def dense(t: torch.Tensor) -> torch.Tensor:
    """t if it is contiguous (no dispatcher call: host time per eager launch), else a copy."""
    return t if t.is_contiguous() else t.contiguous()


def strided(t: torch.Tensor) -> tuple:
    """(tensor with unit last stride, stride_b, stride_h, stride_s) of a (B, H, S, .) tensor."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(2)


@triton.jit
def split_f16(v):
    """fp32 v -> fp16 (hi, lo) with hi + lo == v to ~2^-22 relative."""
    hi = v.to(tl.float16)
    return hi, (v - hi.to(tl.float32)).to(tl.float16)
