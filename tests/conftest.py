"""Shared fixtures: small quantizer constants for op-level tests.

Without a GPU the Triton kernels run in the interpreter: TRITON_INTERPRET must be set before
triton is first imported (importing tq_ops does), so it is set here, first.
"""

import math
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True)  # CI runs the same examples every time
if os.environ.get("CI"):
    settings.load_profile("ci")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tq_ops.codebook import full_table  # noqa: E402
from tq_ops.quantizer import make_quantizers  # noqa: E402
from tq_ops.packing import unpack  # noqa: E402

ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}


def quantizer(kind: str, dim: int, bits: int, seed: int = 0):
    """A TurboQuantMSE ('mse') or TurboQuantProd ('prod') with `bits` user bits."""
    return make_quantizers(dim, bits, bits, kind, seed)[0]


def compress(q, x):
    return torch.ops.tq.compress(x, q.rotation, q.centroids, q.qjl, q.index_bits, q.norm_dtype)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (Dynamo wraps errors raised at trace time)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield


def float64_reconstruction(keys):
    """norm * (c[idx] @ Pi + gamma sqrt(pi/2) / m * s @ S) in float64, straight from the bits
    of packed keys (a PackedKeys of CPU tensors)."""
    idx, norms, signs, residual_norms, rotation, centroids, qjl, index_bits = keys
    table = full_table(centroids, index_bits).double()
    unit = table[unpack(idx, index_bits, rotation.shape[0])] @ rotation.double()
    if qjl is not None:
        m = qjl.shape[0]
        sign = unpack(signs, 1, m).double() * 2 - 1
        unit += residual_norms.double() * (math.sqrt(math.pi / 2) / m) * (sign @ qjl.double())
    return norms.double() * unit


def within_an_ulp(out, truth) -> bool:
    """Every element of out within one ulp of its dtype of the float64 truth, plus 2^-20 of
    the row's norm (kernels whose dots are exact to ~2^-22 of the row, not of each element)."""
    bound = truth.abs() * ULP[out.dtype] + truth.norm(dim=-1, keepdim=True) * 2.0 ** -20
    return bool(((out.cpu().double() - truth).abs() <= bound).all())


def cuda_graph(op, *args):
    """(graph, output) of `op(*args)` captured in a CUDA graph, after one warm-up call (which
    compiles the kernels) on a side stream, as torch.cuda.graphs' docs prescribe."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*args)
    return graph, out


def snapshot(cache):
    """Copies of every layer's packed buffers and length counter (a TurboQuantCache)."""
    return [[t.clone() for t in layer.tensors() + [layer.cumulative_length]]
            for layer in cache.layers]


def assert_unchanged(cache, saved):
    """The cache's buffers and counters equal a `snapshot`, byte for byte."""
    for layer, before in zip(cache.layers, saved):
        for tensor, old in zip(layer.tensors() + [layer.cumulative_length], before):
            assert torch.equal(tensor, old)
