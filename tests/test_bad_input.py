"""Bad input raises TypeError / ValueError naming the argument, eagerly and at trace time."""

import pytest
import torch

from conftest import compress, quantizer, root_cause
from tq_ops import TurboQuantCompressorMSE, TurboQuantCompressorV2, TurboQuantProd, checks
from tq_ops.ops import attention_args
from tq_ops.packing import pack, packed_bytes
from tq_ops.rotation import SEED_RANGE, haar_rotation, qjl_matrix

QUANT = quantizer("prod", 16, 3)
X = torch.randn(1, 2, 4, 16)
FIELDS = QUANT.packed_keys(*compress(QUANT, X))
Q = torch.randn(1, 2, 1, 16)


def compress_call(x=X, index_bits=QUANT.index_bits, centroids=QUANT.centroids, qjl=QUANT.qjl,
                  rotation=QUANT.rotation):
    return torch.ops.tq.compress(x, rotation, centroids, qjl, index_bits, torch.float16)


def scores_call(query=Q, indices=FIELDS[0]):
    return torch.ops.tq.scores(query, *FIELDS._replace(indices=indices))


CASES = [
    ("rank", lambda: compress_call(X[0]), ValueError, "x must have 4 dimensions"),
    ("int dtype", lambda: compress_call(X.to(torch.int32)), TypeError, "x must have dtype"),
    ("complex dtype", lambda: compress_call(X.to(torch.complex64)), TypeError, "x must have dtype"),
    ("head_dim", lambda: compress_call(torch.randn(1, 2, 4, 24)), ValueError, "rotation"),
    ("index_bits range", lambda: compress_call(index_bits=9), ValueError,
     "index_bits must be an int in"),
    ("index_bits vs codebook", lambda: compress_call(index_bits=3), ValueError,
     "centroids must have shape"),
    ("index_bits 0 without qjl",
     lambda: compress_call(index_bits=0, qjl=None, centroids=torch.zeros(1)), ValueError,
     "needs a QJL matrix"),
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


@pytest.mark.parametrize("make", [TurboQuantCompressorV2, TurboQuantCompressorMSE])
@pytest.mark.parametrize("seed,error,message", [
    (True, TypeError, "seed must be an int, got True"),  # was a torch error (or seed 1's cache)
    (1.0, TypeError, "seed must be an int, got 1.0"),
    (2 ** 64 - 1, ValueError, r"seed must be in \[-2\*\*63, 2\*\*64 - 1 - 5327436\]"),  # overflow
    (-2 ** 63 - 1, ValueError, "seed must be in"),
])
def test_compressor_seed_is_checked_and_named(make, seed, error, message):
    TurboQuantCompressorV2(16, 3, seed=1)  # fills the constant caches for seed 1 (== True)
    with pytest.raises(error, match=message):
        make(16, 3, seed=seed)


def test_seed_range_ends_build_both_streams():
    """The ends of SEED_RANGE give a rotation and a QJL matrix (torch.Generator accepts the
    QJL stream's seed there); one past either end is refused."""
    low, high = SEED_RANGE
    for seed in (low, high):
        assert haar_rotation(8, seed).shape == qjl_matrix(8, 8, seed).shape == (8, 8)
    for seed in (low - 1, high + 1):
        with pytest.raises(ValueError, match="seed must be in"):
            qjl_matrix(8, 8, seed)


@pytest.mark.parametrize("value,low,high,message", [
    (9, 0, 8, r"n must be an int in \[0, 8\], got 9"), (-1, 0, 8, r"in \[0, 8\], got -1"),
    (3.0, 0, 8, r"got 3\.0"), (True, 0, 8, r"got True"), ("3", 0, 8, r"got '3'"),
    (0, 1, None, r"n must be a positive int, got 0"), (1, 2, None, r"n must be an int >= 2, got 1"),
])
def test_int_range_refuses_non_ints_and_values_outside(value, low, high, message):
    with pytest.raises(ValueError, match=message):
        checks.int_range("n", value, low, high)
    for inside in (low, high or low + 10**30):  # both ends are allowed, Python ints unbounded
        checks.int_range("n", inside, low, high)


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
    keys = QUANT.packed_keys(*compress(QUANT, x))
    values = vq.packed_values(*compress(vq, x)[:2])
    query = torch.randn(2, 2 * kv_heads, 3, 16)
    return torch.ops.tq.attention(*attention_args(query, keys, values, 0.25, True, None, kv_lens))


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


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def _one_vector(norm: float, dim: int = 16) -> torch.Tensor:
    """(1, 2, 2, dim) float32: one vector of the given norm (in coordinate 0; the norm is
    that float32 number), one of norm 1 and two zero vectors."""
    x = torch.zeros(1, 2, 2, dim)
    x[0, 0, 0, 0], x[0, 1, 1, 5] = norm, 1.0
    return x


def _buffers(quant, norm_dtype, device, byte):
    """compress_into buffers (indices, norms, signs, residual_norms) of 5 slots for
    (1, 2, ., 16) input, every byte set to `byte`."""
    widths = (packed_bytes(16, quant.index_bits), 1, packed_bytes(quant.qjl_dim, 1), 1)
    dtypes = (torch.uint8, norm_dtype, torch.uint8, norm_dtype)
    return [torch.full((1, 2, 5, n * dtype.itemsize), byte, dtype=torch.uint8,
                       device=device).view(dtype) for n, dtype in zip(widths, dtypes)]


def _compress_into(x, quant, buffers, positions=(3, 1)):
    torch.ops.tq.compress_into(x, quant.rotation.to(x.device), quant.centroids.to(x.device),
                               quant.qjl.to(x.device), quant.index_bits,
                               torch.tensor(positions, device=x.device), *buffers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_dtype,norm,advice", [
    (FP16, 3e-8, "pass norm_dtype=torch.float32"),  # stored as 0 before
    (FP16, 6.0e-5, "pass norm_dtype=torch.float32"),  # an fp16 subnormal: 2^-11 lost
    (FP16, 65520.0, "pass norm_dtype=torch.float32"),  # rounds to inf
    (BF16, 1e-38, "rescale the input"),  # below the smallest normal of float32 as well
    (BF16, 3.395e38, "pass norm_dtype=torch.float32"),  # above bfloat16's max, not float32's
    (FP32, 1e-38, "rescale the input"),
    (FP32, 1e-45, "rescale the input")])
def test_norms_outside_the_storable_range_are_refused(device, norm_dtype, norm, advice):
    """compress and compress_into refuse, naming the range and the norm_dtype to use (never
    'pass norm_dtype=torch.float32' to float32 norms); compress_into writes nothing."""
    quant = TurboQuantProd(16, 3)
    x = _one_vector(norm).to(device)
    message = f"x has vectors with norms in .*{str(norm_dtype)}.*{advice}"
    with pytest.raises(ValueError, match=message):
        torch.ops.tq.compress(x, quant.rotation.to(device), quant.centroids.to(device),
                              quant.qjl.to(device), quant.index_bits, norm_dtype)
    buffers = _buffers(quant, norm_dtype, device, 0x5A)
    before = [b.clone() for b in buffers]
    with pytest.raises(ValueError, match=message):
        _compress_into(x, quant, buffers)
    assert all(torch.equal(b.view(torch.uint8), old.view(torch.uint8))
               for b, old in zip(buffers, before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_dtype", [FP16, BF16, FP32])
def test_the_storable_range_edges_are_stored(device, norm_dtype):
    """Exactly finfo.tiny and finfo.max (float32 numbers) are kept to full precision; zero
    vectors stay exactly 0."""
    quant = TurboQuantProd(16, 3)
    info = torch.finfo(norm_dtype)
    for norm in (info.tiny, float(torch.tensor(info.max, dtype=norm_dtype).float())):
        x = _one_vector(norm).to(device)
        out = torch.ops.tq.compress(x, quant.rotation.to(device), quant.centroids.to(device),
                                    quant.qjl.to(device), quant.index_bits, norm_dtype)
        stored = out[1].cpu().double().flatten()
        assert stored[0] == norm and stored[3] == 1 and stored[1] == stored[2] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused_by_the_raw_ops(device, bad):
    """The ops stored NaN / inf norms eagerly; now refused, and compress_into writes nothing."""
    quant = TurboQuantProd(16, 3)
    x = _one_vector(1.0).to(device)
    x[0, 1, 0, 7] = bad
    for norm_dtype in (FP16, FP32):
        with pytest.raises(ValueError, match="x has non-finite values"):
            torch.ops.tq.compress(x, quant.rotation.to(device), quant.centroids.to(device),
                                  quant.qjl.to(device), quant.index_bits, norm_dtype)
    buffers = _buffers(quant, FP16, device, 0)
    with pytest.raises(ValueError, match="x has non-finite values"):
        _compress_into(x, quant, buffers)
    assert all(not b.any() for b in buffers)


def test_float32_norm_overflow_message_does_not_suggest_float32():
    """The check on stored norms said 'pass norm_dtype=torch.float32' for float32 norms too."""
    from tq_ops import checks
    with pytest.raises(ValueError, match="rescale the input") as info:
        checks.storable_norms("x", torch.tensor([float("inf")]), FP32)
    assert "norm_dtype=torch.float32" not in str(info.value)
    with pytest.raises(ValueError, match="pass norm_dtype=torch.float32"):
        checks.storable_norms("x", torch.tensor([1e6]), FP16)


@pytest.mark.parametrize("seed", [True, 1.0])
def test_quantizers_refuse_a_non_int_seed(seed):
    """TurboQuantMSE(..., seed=True) reused seed 1's shared constants without an error."""
    from tq_ops import TurboQuantMSE, TurboQuantProd
    for make in (TurboQuantMSE, TurboQuantProd):
        with pytest.raises(TypeError, match="seed"):
            make(16, 2, seed)
