"""Bad input raises TypeError / ValueError naming the argument, eagerly and at trace time."""

import pytest
import torch

from conftest import compress, key_fields, quantizer, root_cause
from tq_ops import TurboQuantCompressorMSE, TurboQuantCompressorV2, TurboQuantProd
from tq_ops.packing import pack, packed_bytes

QUANT = quantizer("prod", 16, 3)
X = torch.randn(1, 2, 4, 16)
FIELDS = key_fields(QUANT, compress(QUANT, X))
Q = torch.randn(1, 2, 1, 16)


def compress_call(x=X, bits=QUANT.index_bits, centroids=QUANT.centroids, qjl=QUANT.qjl,
                  rotation=QUANT.rotation):
    return torch.ops.tq.compress(x, rotation, centroids, qjl, bits, torch.float16)


def scores_call(query=Q, indices=FIELDS[0]):
    return torch.ops.tq.scores(query, indices, *FIELDS[1:])


CASES = [
    ("rank", lambda: compress_call(X[0]), ValueError, "x must have 4 dimensions"),
    ("int dtype", lambda: compress_call(X.to(torch.int32)), TypeError, "x must have dtype"),
    ("complex dtype", lambda: compress_call(X.to(torch.complex64)), TypeError, "x must have dtype"),
    ("head_dim", lambda: compress_call(torch.randn(1, 2, 4, 24)), ValueError, "rotation"),
    ("bits range", lambda: compress_call(bits=9), ValueError, "bits must be an int in"),
    ("bits vs codebook", lambda: compress_call(bits=3), ValueError, "centroids must have shape"),
    ("bits 0 without qjl", lambda: compress_call(bits=0, qjl=None, centroids=torch.zeros(1)),
     ValueError, "needs a QJL matrix"),
    ("query head_dim", lambda: scores_call(torch.randn(1, 2, 1, 8)), ValueError, "head_dim"),
    ("query heads", lambda: scores_call(torch.randn(1, 3, 1, 16)), ValueError, "multiple"),
    ("query int", lambda: scores_call(Q.long()), TypeError, "query must have dtype"),
    ("packed width", lambda: scores_call(indices=FIELDS[0][..., :3]), ValueError, "indices"),
    ("packed dtype", lambda: scores_call(indices=FIELDS[0].int()), TypeError, "indices"),
    ("device", lambda: scores_call(Q.to("meta")), ValueError, "on meta"),
]


@pytest.mark.parametrize("name,call,error,message", CASES, ids=[c[0] for c in CASES])
def test_eager(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("name,call,error,message", CASES[:9], ids=[c[0] for c in CASES[:9]])
def test_at_trace_time(name, call, error, message):
    with pytest.raises(Exception) as info:
        torch.compile(call, backend="eager", fullgraph=True)()
    cause = root_cause(info.value)
    assert isinstance(cause, error) and message in str(cause)


def test_compressor_checks():
    with pytest.raises(ValueError, match="bits"):
        TurboQuantCompressorV2(head_dim=128, bits=0)
    with pytest.raises(ValueError, match="dim"):
        TurboQuantCompressorMSE(head_dim=4)
    comp = TurboQuantCompressorV2(head_dim=64)
    with pytest.raises(ValueError, match="keys has head_dim 32"):
        comp.compress(torch.randn(1, 1, 2, 32))
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        comp.compress([[1.0]])


def test_overflowing_norm_is_refused_not_stored_as_inf():
    quant = TurboQuantProd(16, 3)
    big = torch.full((1, 1, 1, 16), 1e5)
    with pytest.raises(ValueError, match="float32"):
        quant.quantize(big)
    wide = TurboQuantProd(16, 3, norm_dtype=torch.float32)
    x_hat = wide.dequantize(*wide.quantize(big))
    assert torch.isfinite(x_hat).all()
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize(torch.full((1, 1, 1, 16), float("nan")))


@pytest.mark.parametrize("make,message", [
    (lambda: TurboQuantCompressorV2(head_dim=16.0), "head_dim must be an int in"),  # was "qjl_dim"
    (lambda: TurboQuantCompressorV2(head_dim=4, bits=1), "head_dim must be an int in"),
    (lambda: TurboQuantProd(16.0, 3), "dim must be an int in"),
    (lambda: TurboQuantProd(True, 1), "dim must be an int in"),  # was a randn() TypeError
    (lambda: TurboQuantProd(0, 1), "dim must be an int in"),
    (lambda: TurboQuantProd(16, 3, qjl_dim=True), "qjl_dim must be a positive int"),
])
def test_dim_is_checked_first_and_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("bits", [9, 12, 16, -1, 3.0])
def test_packing_refuses_bits_out_of_range(bits):
    """packed_bytes(16, 12) was 8 (the 4-bit plane only), pack(codes, 9) kept 1 bit."""
    with pytest.raises(ValueError, match="bits must be an int in \\[0, 8\\]"):
        packed_bytes(16, bits)
    with pytest.raises(ValueError, match="bits must be an int"):
        pack(torch.zeros(1, 16, dtype=torch.int32), bits)


def attention_call(kv_lens, kv_heads=2):
    vq = quantizer("mse", 16, 2, seed=1)
    x = torch.randn(2, kv_heads, 6, 16, generator=torch.Generator().manual_seed(0))
    k_fields = key_fields(QUANT, compress(QUANT, x))
    query = torch.randn(2, 2 * kv_heads, 3, 16)
    return torch.ops.tq.attention(query, *k_fields, *compress(vq, x)[:2], vq.rotation,
                                  vq.centroids, vq.index_bits, 0.25, True, None, kv_lens)


@pytest.mark.parametrize("kv_lens", [[7, 6], [6, -1]])
def test_attention_kv_lens_beyond_the_keys(kv_lens):
    """kv_lens > Lk: the reference shifted the causal diagonal by kv_lens, the CUDA kernel by
    min(kv_lens, Lk), so CPU and GPU gave different outputs; now refused."""
    with pytest.raises(ValueError, match="kv_lens must lie in \\[0, 6\\]"):
        attention_call(torch.tensor(kv_lens))
    assert attention_call(torch.tensor([6, 0])).shape == (2, 4, 3, 16)  # the bounds are fine


def test_attention_with_zero_kv_heads_names_the_problem():
    with pytest.raises(ValueError, match="0 heads"):  # was ZeroDivisionError
        attention_call(None, kv_heads=0)
