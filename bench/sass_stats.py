"""Compile tq_ops kernels for sm_90 without a GPU and count what their inner loops execute.

Run from the repository root: `PYTHONPATH=. python bench/sass_stats.py`. Triton's bundled
ptxas, cuobjdump and nvdisasm build each kernel for an H100/H200 target on any machine;
arguments get the specialisations a real launch would give (pointers 16-byte aligned,
integers equal to 1 folded in, multiples of 16 marked divisible). Prints per kernel and
variant: registers, stack bytes, instructions in the longest loop body, and the most frequent
opcodes there. Used to choose between kernel variants while GPU time is short (ARCHITECTURE.md,
BENCHMARKS.md); it measures nothing about speed.
"""

import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tq_ops.kernels import attention, compress
from tq_ops.kernels.codes import (PAIRS, PLANES3, SIGN_BITS, SIGNS, TABLE, plane_layout, prefixed,
                                  sign_layout)
from tq_ops.packing import plane_widths

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def build(fn, constexprs: dict, ints: dict, pointers: dict, **options):
    """fn compiled for sm_90: constexprs by name, integer arguments by example value,
    pointer element types by name (default fp16)."""
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = dict(constexprs, **{k: 1 for k, v in ints.items() if v == 1})
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*fp16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)


def summary(kernel) -> str:
    """Registers, stack, and the opcode histogram of the longest backward-branch loop."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", cubin.name],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", cubin.name],
                              capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    labels, code = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(code)
        elif re.match(r"\s+/\*[0-9a-f]{4}\*/", line):
            code.append(line)
    loop = (0, 0)
    for i, line in enumerate(code):
        target = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i + 1) <= i:
            loop = max(loop, (i + 1 - labels[target.group(1)], labels[target.group(1)]))
    ops = collections.Counter(
        re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line).group(1)
        for line in code[loop[1]:loop[1] + loop[0]])
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
    return f"| {regs} | {stack} | {loop[0]} | {top} |"


def attention_decode(k_index_bits: int, prod: bool, v_index_bits: int, ptx: bool,
                     exact: bool = False, num_warps: int = 4):
    """Split-KV decode at batch 32 / 32k, H_kv 8, GQA 4, d 128 (Prod keys: m = 128 signs),
    with the GPU decode defaults of `attention.config` (at most 128 registers; 64-key tiles
    in three stages for Prod keys or values of other than 4 bits, else 128-key tiles in one).
    ptx: the GPU decode modes (PTX for 2-4-bit codes and signs), else centroid gathers.
    exact: with sink and window tokens (`ExactTokens`: 4 sinks)."""
    tiles = (attention.DEEP_DECODE if attention.wants_deep_decode(prod, v_index_bits)
             else dict(BLOCK_N=128, num_stages=1))
    length = 32768
    k_bytes, v_bytes = 16 * k_index_bits, 16 * v_index_bits
    ints = dict(o_sb=0, o_sh=0, o_ss=0,
                ki_sb=8 * length * k_bytes, ki_sh=length * k_bytes, ki_ss=k_bytes,
                kn_sb=8 * length, kn_sh=length, kn_ss=1,
                ks_sb=8 * length * 16, ks_sh=length * 16, ks_ss=16, kr_sb=8 * length,
                kr_sh=length, kr_ss=1, vi_sb=8 * length * v_bytes, vi_sh=length * v_bytes,
                vi_ss=v_bytes, vn_sb=8 * length, vn_sh=length, vn_ss=1, m_sb=0, m_sh=0, m_sq=0,
                m_sk=0, HKV=8, Lq=1, Lk=length, R=4, CHUNK=length // 2, SINKS=4)
    if not prod:
        ints.update(ks_sb=0, ks_sh=0, ks_ss=0, kr_sb=0, kr_sh=0, kr_ss=0)
    mode = {2: PAIRS, 3: PLANES3} if ptx else {}
    constexprs = dict(G=4, DK=128, DV=128, DV_PAD=128, M=128 if prod else 1,
                      **prefixed("K_", plane_layout(128, k_index_bits)),
                      **prefixed("V_", plane_layout(128, v_index_bits)),
                      **sign_layout(128 if prod else 16),
                      HAS_QJL=prod, IS_CAUSAL=False, HAS_MASK=False, MASK_BOOL=False,
                      MASK_KEYS=False, HAS_LENS=True, SPLIT=True, HAS_EXACT=exact,
                      K_MODE=mode.get(k_index_bits, TABLE).value,
                      V_MODE=mode.get(v_index_bits, TABLE).value,
                      S_MODE=(SIGN_BITS if ptx else SIGNS).value, K_PTX=ptx and k_index_bits == 4,
                      V_PTX=ptx and v_index_bits == 4, K_HALF=ptx, V_HALF=ptx,
                      BLOCK_M=16, BLOCK_N=tiles["BLOCK_N"], OUT_BLOCK=32,
                      DEFER_SUM=tiles.get("DEFER_SUM", False), SKIP_EMPTY=False)
    pointers = dict(o_ptr="*fp32", ml_ptr="*fp32", ki_ptr="*u8", ks_ptr="*u8", vi_ptr="*u8",
                    lens_ptr="*i32", first_ptr="*i32", kc_ptr="*fp32", vc_ptr="*fp32",
                    vr_ptr="*fp32")
    return build(attention._attention_kernel, constexprs, ints, pointers, num_warps=num_warps,
                 num_stages=tiles["num_stages"], maxnreg=128)


def compress_fp16(qjl_dim: int, index_bits: int, block_m: int = 64, num_warps: int = 4):
    """Compress of fp16 (B, H, S, 128) rows, symmetric codebook; qjl_dim 0 = MSE only."""
    ints = dict(stride_xb=8 * 65536 * 128, stride_xh=65536 * 128, stride_xs=128, stride_xd=1,
                stride_ib=8 * 65536 * 64, stride_ih=65536 * 64, stride_is=64, stride_ip=1,
                stride_nb=8 * 65536, stride_nh=65536, stride_ns=1, stride_gb=8 * 65536 * 16,
                stride_gh=65536 * 16, stride_gs=16, stride_gp=1, stride_rb=8 * 65536,
                stride_rh=65536, stride_rs=1, BH=8, H=8, S=65536, S_out=65536)
    widths = plane_widths(index_bits) + (0, 0, 0)
    qseg_p = max(2, triton.next_power_of_2(qjl_dim // 8)) if qjl_dim else 2
    layout = compress._plan_layout(128, index_bits, qjl_dim or None)
    offsets = {k: layout[k] for k in ("QJL_OFF", "BND_OFF", "CENT_OFF")}
    constexprs = dict(D=128, D_P=128, SEG=16, SEG_P=16, M_QJL=qjl_dim, QSEG=qjl_dim // 8,
                      QSEG_P=qseg_p, BITS=index_bits, W0=widths[0], W1=widths[1], W2=widths[2],
                      HAS_QJL=qjl_dim > 0, HAS_POS=False, X_FP16=True, KB=128,
                      QBLOCK=8 * qseg_p, BLOCK_M=block_m, SYM=True, **offsets)
    pointers = dict(plan_ptr="*u8", pos_ptr="*i64", idx_ptr="*u8", sgn_ptr="*u8")
    return build(compress._compress_kernel, constexprs, ints, pointers, num_warps=num_warps,
                 num_stages=2)


DECODE_VARIANTS = [  # (label, key index_bits, Prod keys, value index_bits, GPU decode modes,
    # exact tokens)
    ("K4/V4 mse, PTX", 4, False, 4, True),
    ("K4/V3 mse, PTX", 4, False, 3, True),
    ("K4/V3 mse, PTX, exact tokens", 4, False, 3, True, True),
    ("K4/V4 mse, gathers", 4, False, 4, False),
    ("K3/V3 mse, PTX", 3, False, 3, True),
    ("K4/V4 prod, PTX", 3, True, 4, True),
    ("K3/V3 prod, PTX", 2, True, 3, True),
    ("K3/V3 prod, gathers", 2, True, 3, False),
]


def main() -> None:
    print("| kernel | registers | stack bytes | loop instructions | top opcodes in the loop |")
    print("|---|---|---|---|---|")
    for label, *variant in DECODE_VARIANTS:
        kernel = attention_decode(*variant)
        print(f"| attention decode {label} " + summary(kernel), flush=True)
    for label, qjl_dim, index_bits in (("MSE 4-bit", 0, 4), ("Prod 4-bit", 128, 3)):
        print(f"| compress fp16 {label} " + summary(compress_fp16(qjl_dim, index_bits)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
