"""The Triton compress kernels under TRITON_INTERPRET, against `tq_ops.reference.compress`.

Tiny CPU shapes on fresh random data. Packed codes / sign bits must equal the reference's
except at rounding ties: coordinates whose rotated value lies within 1e-5 of a codebook
boundary, sign bits whose projection S r lies within 1e-5 of 0. The interpreter is
switched on by tests/conftest.py before triton is imported.
"""

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from tq_ops import reference
from tq_ops.codebook import full_table, half_table, lloyd_max
from tq_ops.kernels import compress as kernels
from tq_ops.packing import unpack
from tq_ops.rotation import haar_rotation, qjl_matrix

# tests/conftest.py turns the interpreter on when there is no GPU; tests/gpu covers a GPU.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests/gpu covers the kernels")
assert torch.cuda.is_available() or isinstance(kernels._compress_kernel, InterpretedFunction)
TIE = 1e-5


def constants(dim: int, index_bits: int, qjl_dim: int | None, seed: int = 0):
    """rotation (dim, dim), centroids (the upper half (2**(index_bits-1),) of the symmetric
    codebook, as quantizers pass it), qjl (qjl_dim, dim) or None, all float32."""
    centroids = half_table(lloyd_max(dim, index_bits).float()) if index_bits else torch.zeros(1)
    qjl = None if qjl_dim is None else qjl_matrix(qjl_dim, dim, seed)
    return haar_rotation(dim, seed), centroids, qjl


def check_against_reference(x, rotation, centroids, qjl, index_bits, out) -> dict:
    """Compare kernel outputs (indices, norms, signs, residual_norms) with the reference.

    Codes are compared with the reference's; a mismatch is a tie when the rotated value lies
    within TIE of a boundary. Sign bits and residual norms are checked against S r and ||r||
    formed from the kernel's own codes (a tie changes a vector's residual by a whole
    centroid gap); a sign mismatch is a tie when |S r| < TIE. Returns the counts and the
    largest boundary gap among code mismatches; raises AssertionError on a shape / dtype
    difference or on norms that are not close.
    """
    ref = reference.compress(x.cpu(), rotation.cpu(), centroids.cpu(),
                             None if qjl is None else qjl.cpu(), index_bits, out[1].dtype)
    out = [t.cpu() for t in out]
    rotation, centroids = rotation.cpu(), full_table(centroids.cpu(), index_bits)
    for got, want in zip(out, ref):
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    xf = x.cpu().float()
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    rotated = torch.where(norm > 0, xf / norm, 0.0) @ rotation.T
    report = dict(codes=rotated.numel(), code_mismatch=0, code_ties=0, max_gap=0.0, signs=0,
                  sign_mismatch=0, sign_ties=0)
    codes = torch.zeros(rotated.shape, dtype=torch.long)
    if index_bits:
        codes = unpack(out[0], index_bits, x.shape[-1]).long()
        bad = codes != unpack(ref[0], index_bits, x.shape[-1])
        bounds = (centroids[1:] + centroids[:-1]) / 2
        above = torch.bucketize(rotated, bounds).clamp(max=bounds.numel() - 1)
        gap = torch.minimum((rotated - bounds[above]).abs(),
                            (rotated - bounds[(above - 1).clamp(min=0)]).abs())
        report.update(code_mismatch=int(bad.sum()), code_ties=int((bad & (gap < TIE)).sum()),
                      max_gap=float(gap[bad].max()) if bad.any() else 0.0)
    torch.testing.assert_close(out[1].float(), ref[1].float(), rtol=2e-3, atol=1e-6)
    if qjl is not None:
        resid = rotated - (centroids[codes] if index_bits else 0.0)
        projection = (resid @ rotation) @ qjl.cpu().T
        bad = unpack(out[2], 1, qjl.shape[0]).bool() != (projection >= 0)
        report.update(signs=projection.numel(), sign_mismatch=int(bad.sum()),
                      sign_ties=int((bad & (projection.abs() < TIE)).sum()))
        gamma = torch.linalg.vector_norm(resid, dim=-1, keepdim=True).to(out[3].dtype)
        torch.testing.assert_close(out[3].float(), gamma.float(), rtol=2e-3, atol=1e-5)
    return report


CASES = [  # (dim, index bits, qjl rows or None, input dtype)
    (16, 3, None, torch.float32),
    (128, 4, None, torch.float16),
    (80, 5, 80, torch.float16),
    (64, 7, 64, torch.bfloat16),
    (16, 8, None, torch.float32),
    (32, 0, 32, torch.float32),
    (64, 1, 64, torch.float16),
    (96, 2, None, torch.bfloat16),
    (64, 6, 20, torch.float32),
]


@pytest.mark.parametrize("dim,index_bits,qjl_dim,dtype", CASES)
def test_compress_matches_reference(dim, index_bits, qjl_dim, dtype):
    rotation, centroids, qjl = constants(dim, index_bits, qjl_dim, seed=dim + index_bits)
    x = torch.randn(2, 3, 7, dim).to(dtype)
    x[0, 1, 2] = 0  # a zero vector: norm 0, unit vector 0
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous input
    out = kernels.compress(x, rotation, centroids, qjl, index_bits, torch.float16)
    report = check_against_reference(x, rotation, centroids, qjl, index_bits, out)
    assert report["code_mismatch"] == report["code_ties"], report
    assert report["sign_mismatch"] == report["sign_ties"], report


@pytest.mark.parametrize("qjl_dim,norm_dtype", [(None, torch.float32), (48, torch.bfloat16)])
def test_compress_into_writes_exactly_the_given_slots(qjl_dim, norm_dtype):
    dim, index_bits, slots = 48, 3, 11
    rotation, centroids, qjl = constants(dim, index_bits, qjl_dim)
    x = torch.randn(2, 2, 5, dim, dtype=torch.float16)
    positions = torch.tensor([9, -1, 0, slots + 3, 4])  # two slots out of range: never written
    fresh = kernels.compress(x, rotation, centroids, qjl, index_bits, norm_dtype)
    lead = (2, 2, slots)
    buffers = [torch.full(lead + (fresh[0].shape[-1],), 0xAA, dtype=torch.uint8),
               torch.full(lead + (1,), float("nan"), dtype=norm_dtype), None, None]
    if qjl is not None:
        buffers[2] = torch.full(lead + (fresh[2].shape[-1],), 0xAA, dtype=torch.uint8)
        buffers[3] = torch.full(lead + (1,), float("nan"), dtype=norm_dtype)
    untouched = [None if b is None else b.clone() for b in buffers]
    kernels.compress_into(x, rotation, centroids, qjl, index_bits, positions, *buffers)
    written = torch.tensor([9, 0, 4])
    source = torch.tensor([0, 2, 4])
    keep = torch.tensor([s for s in range(slots) if s not in (9, 0, 4)])
    for buf, new, before in zip(buffers, fresh, untouched):
        if buf is None:
            continue
        assert torch.equal(buf[:, :, written], new[:, :, source])
        assert torch.equal(buf[:, :, keep].view(torch.uint8), before[:, :, keep].view(torch.uint8))


@pytest.mark.parametrize("index_bits,qjl_dim", [(3, None), (2, 32)])
def test_compress_asymmetric_codebook(index_bits, qjl_dim):
    """Codebooks that are not symmetric take the counting path, with the same results."""
    rotation, centroids, qjl = constants(32, index_bits, qjl_dim)
    centroids = full_table(centroids, index_bits) + torch.linspace(0.0, 0.01, 1 << index_bits)
    x = torch.randn(1, 2, 9, 32, dtype=torch.float16)
    out = kernels.compress(x, rotation, centroids, qjl, index_bits, torch.float16)
    report = check_against_reference(x, rotation, centroids, qjl, index_bits, out)
    assert report["code_mismatch"] == report["code_ties"], report
    assert report["sign_mismatch"] == report["sign_ties"], report


@pytest.mark.parametrize("index_bits,qjl_dim", [(4, None), (2, 40)])
def test_a_plan_built_once_gives_the_bytes_of_a_call_without_one(index_bits, qjl_dim):
    """Plan/run: `build_plan` once, then compress and compress_into read it; a whole symmetric
    table (the counting path) gives the same codes as its upper half (the bisection)."""
    rotation, centroids, qjl = constants(40, index_bits, qjl_dim)
    x = torch.randn(2, 2, 6, 40, dtype=torch.float16)
    plan = kernels.build_plan(rotation, centroids, qjl, index_bits)
    assert plan.shape == (kernels.plan_bytes(40, index_bits, qjl_dim),)
    alone = kernels.compress(x, rotation, centroids, qjl, index_bits, torch.float16)
    planned = kernels.compress(x, rotation, centroids, qjl, index_bits, torch.float16, plan)
    whole = kernels.compress(x, rotation, full_table(centroids, index_bits), qjl, index_bits,
                             torch.float16)
    for a, b, c in zip(alone, planned, whole):
        assert torch.equal(a, b) and torch.equal(a, c)
    buffers = [torch.zeros_like(t) for t in alone]
    kernels.compress_into(x, rotation, centroids, qjl, index_bits, torch.arange(6), *buffers,
                          plan=plan)
    for a, b in zip(alone, buffers):
        assert torch.equal(a, b)


def test_bucketize_exact_at_boundaries():
    """The symmetric bisection decides y > boundary exactly: at each boundary, one float to
    either side of it, at +-0 and beyond the extremes."""
    import triton
    import triton.language as tl

    @triton.jit
    def bucketize(y_ptr, bnd_ptr, out_ptr, BITS: tl.constexpr):
        offs = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
        tl.store(out_ptr + offs, kernels._bucketize(tl.load(y_ptr + offs), bnd_ptr, BITS, True))

    for index_bits in (1, 2, 4, 6):
        centroids = lloyd_max(64, index_bits).float()
        bounds = (centroids[1:] + centroids[:-1]) / 2
        near = torch.cat([bounds, bounds.nextafter(torch.tensor(1.0)),
                          bounds.nextafter(torch.tensor(-1.0)),
                          torch.tensor([0.0, -0.0, 1.0, -1.0])])
        y = torch.zeros(256)
        y[:near.numel()] = near
        out = torch.empty(256, dtype=torch.int32)
        bucketize[(1,)](y, bounds, out, BITS=index_bits)
        assert torch.equal(out, torch.bucketize(y, bounds).int()), index_bits
