"""The `tq::` ops on CPU: opcheck, contracts, independent float64 references, compile."""

import math
import weakref
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import compress, quantizer
from tq_ops import ops, reference
from tq_ops.codebook import full_table
from tq_ops.kernels.compress import plan_bytes
from tq_ops.packing import packed_bytes

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def packed(kq, vq, k, v):
    """(PackedKeys, PackedValues) of k and v compressed by kq and vq."""
    return kq.packed_keys(*compress(kq, k)), vq.packed_values(*compress(vq, v)[:2])


def attention_args(q, kq, vq, k, v, scale=0.3, causal=False, mask=None, kv_lens=None):
    """The flat `tq::attention` arguments of k and v compressed by kq and vq."""
    return ops.attention_args(q, *packed(kq, vq, k, v), scale, causal, mask, kv_lens)


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("kind,bits", [("mse", 3), ("prod", 4), ("prod", 1), ("mse", 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_compress_decompress_scores(kind, bits, dtype):
    quant = quantizer(kind, 16, bits)
    x = randn(2, 2, 5, 16, dtype=dtype)
    torch.library.opcheck(torch.ops.tq.compress.default,
                          (x, quant.rotation, quant.centroids, quant.qjl, quant.index_bits,
                           torch.float16))
    fields = quant.packed_keys(*compress(quant, x))
    torch.library.opcheck(torch.ops.tq.decompress.default, fields + (dtype,))
    query = randn(2, 4, 3, 16, dtype=dtype, seed=1)
    torch.library.opcheck(torch.ops.tq.scores.default, (query,) + fields)


@pytest.mark.parametrize("kind", ["mse", "prod"])
def test_opcheck_compress_into(kind):
    quant = quantizer(kind, 16, 3)
    x = randn(1, 2, 3, 16)
    buffers = [t.new_zeros(1, 2, 10, t.shape[-1]) for t in compress(quant, x)]
    if kind == "mse":
        buffers[2:] = [None, None]
    torch.library.opcheck(torch.ops.tq.compress_into.default,
                          (x, quant.rotation, quant.centroids, quant.qjl, quant.index_bits,
                           torch.tensor([7, 2, 4]), *buffers))


@pytest.mark.parametrize("variant", ["plain", "causal", "bool_mask", "float_mask", "kv_lens"])
def test_opcheck_attention(variant):
    kq, vq = quantizer("prod", 16, 3), quantizer("mse", 16, 2, seed=1)
    q, k, v = randn(2, 4, 3, 16), randn(2, 2, 6, 16, seed=1), randn(2, 2, 6, 16, seed=2)
    mask = {"bool_mask": randn(2, 1, 3, 6, seed=3) > 0,
            "float_mask": randn(1, 4, 3, 6, seed=3)}.get(variant)
    kv_lens = torch.tensor([6, 4]) if variant == "kv_lens" else None
    args = attention_args(q, kq, vq, k, v, causal=variant == "causal", mask=mask, kv_lens=kv_lens)
    torch.library.opcheck(torch.ops.tq.attention.default, args)


def test_compress_plan_is_checked_and_none_on_the_cpu():
    """Plan/run: `ops.compress_plan` is what CUDA kernels read (None here); a plan of the wrong
    size or dtype is refused before anything runs."""
    quant = quantizer("mse", 16, 3)
    constants = (quant.rotation, quant.centroids, None, 3)
    assert ops.compress_plan(*constants) is None
    x = randn(1, 2, 3, 16)
    plan = torch.zeros(plan_bytes(16, 3, None), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.tq.compress.default, (x, *constants, torch.float16, plan))
    for got, want in zip(torch.ops.tq.compress(x, *constants, torch.float16, plan),
                         torch.ops.tq.compress(x, *constants, torch.float16)):
        assert torch.equal(got, want)
    buffers = [t.new_zeros(1, 2, 4, t.shape[-1]) for t in compress(quant, x)[:2]]
    with pytest.raises(ValueError, match="plan must have shape"):
        torch.ops.tq.compress_into(x, *constants, torch.arange(3), *buffers, None, None, plan[1:])
    with pytest.raises(TypeError, match="plan must have dtype"):
        torch.ops.tq.compress(x, *constants, torch.float16, plan.float())


@pytest.mark.parametrize("k_bits,v_bits", [(4, 3), (3, 2)])
def test_a_symmetric_codebook_whole_or_as_its_upper_half_gives_the_same_results(k_bits, v_bits):
    """Quantizers pass a symmetric codebook as its upper half (kernels specialise on that
    shape); the whole table is accepted too and gives the same bytes and outputs; any other
    length is refused."""
    kq, vq = quantizer("prod", 16, k_bits), quantizer("mse", 16, v_bits, seed=1)
    q, k, v = randn(1, 4, 2, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    half = attention_args(q, kq, vq, k, v)
    whole = list(half)
    whole[6] = full_table(kq.centroids, kq.index_bits)
    whole[12] = full_table(vq.centroids, vq.index_bits)
    assert whole[6].shape == (1 << kq.index_bits,) and half[6].shape == (1 << kq.index_bits - 1,)
    assert torch.equal(torch.ops.tq.attention(*half), torch.ops.tq.attention(*whole))
    for got, want in zip(torch.ops.tq.compress(k, *half[5:9], torch.float16),
                         torch.ops.tq.compress(k, *whole[5:9], torch.float16)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="k_centroids must have shape"):
        torch.ops.tq.attention(*half[:6], whole[6][1:], *half[7:])


@pytest.mark.parametrize("kind", ["mse", "prod"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_read_cache_is_two_decompressions(kind, dtype):
    """tq::read_cache: opcheck, and its outputs equal tq::decompress of keys and of values."""
    kq, vq = quantizer(kind, 16, 3), quantizer("mse", 16, 2, seed=1)
    keys, values = packed(kq, vq, randn(2, 2, 6, 16), randn(2, 2, 6, 16, seed=1))
    args = (*keys, *values, torch.tensor(4), dtype)
    torch.library.opcheck(torch.ops.tq.read_cache.default, args)
    got_k, got_v = torch.ops.tq.read_cache(*args)
    assert torch.equal(got_k, torch.ops.tq.decompress(*keys, dtype))
    assert torch.equal(got_v, torch.ops.tq.decompress(*values.as_keys(), dtype))
    with pytest.raises(TypeError, match="written must have dtype"):
        torch.ops.tq.read_cache(*args[:-2], torch.tensor(4.0), dtype)


# ------------------------------------------------------- shape/dtype contracts (fuzzed)

@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["mse", "prod"]), bits=st.integers(1, 8),
       dim=st.sampled_from([8, 9, 17, 33, 64, 80, 96, 128]), batch=st.integers(1, 2),
       heads=st.integers(1, 3), seq=st.integers(0, 6), dtype=st.sampled_from(DTYPES),
       out_dtype=st.sampled_from(DTYPES))
def test_compress_decompress_contract(kind, bits, dim, batch, heads, seq, dtype, out_dtype):
    quant = quantizer(kind, dim, bits)
    x = randn(batch, heads, seq, dim, dtype=dtype)
    fields = compress(quant, x)
    lead = (batch, heads, seq)
    assert fields[0].shape == lead + (packed_bytes(dim, quant.index_bits),)
    assert fields[0].dtype == torch.uint8 and fields[1].shape == lead + (1,)
    assert fields[1].dtype == torch.float16
    has_qjl = kind == "prod"
    assert fields[2].shape == lead + ((packed_bytes(dim, 1),) if has_qjl else (0,))
    assert fields[3].shape == lead + ((1,) if has_qjl else (0,))
    x_hat = torch.ops.tq.decompress(*quant.packed_keys(*fields), out_dtype)
    assert x_hat.shape == x.shape and x_hat.dtype == out_dtype
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.tq.compress(mode.from_tensor(x), mode.from_tensor(quant.rotation),
                                     mode.from_tensor(quant.centroids),
                                     None if quant.qjl is None else mode.from_tensor(quant.qjl),
                                     quant.index_bits, torch.float16)
    for real, meta in zip(fields, fake):
        assert (real.shape, real.dtype, real.stride()) == (meta.shape, meta.dtype, meta.stride())


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["mse", "prod"]), bits=st.integers(1, 4),
       dim=st.sampled_from([16, 24, 40]), group=st.sampled_from([1, 2, 4]),
       q_len=st.integers(1, 4), kv_len=st.integers(0, 7), dtype=st.sampled_from(DTYPES))
def test_scores_equal_inner_products_with_the_reconstruction(kind, bits, dim, group, q_len,
                                                               kv_len, dtype):
    """The estimator is linear: scores == q @ decompress(k)^T (float64, independent path)."""
    quant = quantizer(kind, dim, bits)
    k = randn(2, 2, kv_len, dim, seed=1)
    q = randn(2, 2 * group, q_len, dim, dtype=dtype, seed=2)
    fields = quant.packed_keys(*compress(quant, k))
    got = torch.ops.tq.scores(q, *fields)
    assert got.shape == (2, 2 * group, q_len, kv_len) and got.dtype == dtype
    k_hat = torch.ops.tq.decompress(*fields, torch.float32).double()
    k_hat = k_hat.repeat_interleave(group, dim=1)
    expected = q.double() @ k_hat.transpose(-1, -2)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()) if expected.numel() else 0.0)


# ------------------------------------------------------------------ attention semantics

def attention_float64(q, k_hat, v_hat, scale, causal, mask, kv_lens):
    """Straightforward per-(batch, head, query) softmax attention in float64."""
    batch, heads, q_len, _ = q.shape
    group = heads // k_hat.shape[1]
    out = torch.zeros(batch, heads, q_len, v_hat.shape[-1], dtype=torch.float64)
    for b in range(batch):
        length = k_hat.shape[2] if kv_lens is None else int(kv_lens[b])
        for h in range(heads):
            for i in range(q_len):
                logits = scale * (k_hat[b, h // group] @ q[b, h, i].double())
                allowed = torch.arange(k_hat.shape[2]) < length
                if causal:
                    allowed &= torch.arange(k_hat.shape[2]) <= length - q_len + i
                if mask is not None and mask.dtype == torch.bool:
                    allowed &= mask.expand(batch, heads, q_len, -1)[b, h, i]
                elif mask is not None:
                    logits = logits + mask.expand(batch, heads, q_len, -1)[b, h, i].double()
                allowed &= logits > -math.inf  # a float mask of -inf hides the key too
                if allowed.any():
                    p = torch.softmax(logits.masked_fill(~allowed, -math.inf), 0)
                    out[b, h, i] = p @ v_hat[b, h // group]
    return out


@pytest.mark.parametrize("causal,mask_kind,ragged", [
    (False, None, False), (True, None, False), (True, None, True), (False, "bool", True),
    (False, "float", False), (True, "bool", True)])
@pytest.mark.parametrize("key_kind", ["mse", "prod"])
def test_attention_matches_float64_attention_on_reconstructions(causal, mask_kind, ragged,
                                                                key_kind):
    kq, vq = quantizer(key_kind, 32, 3), quantizer("mse", 32, 3, seed=1)
    q, k, v = randn(2, 8, 3, 32), randn(2, 2, 9, 32, seed=1), randn(2, 2, 9, 32, seed=2)
    mask = {"bool": randn(2, 1, 3, 9, seed=3) > -0.5, "float": randn(2, 8, 3, 9, seed=3)}.get(
        mask_kind)
    kv_lens = torch.tensor([9, 5]) if ragged else None
    args = attention_args(q, kq, vq, k, v, 0.2, causal, mask, kv_lens)
    got = torch.ops.tq.attention(*args)
    k_hat = torch.ops.tq.decompress(*kq.packed_keys(*compress(kq, k)), torch.float32).double()
    v_hat = torch.ops.tq.decompress(*vq.packed_keys(*compress(vq, v)), torch.float32).double()
    expected = attention_float64(q, k_hat, v_hat, 0.2, causal, mask, kv_lens)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_attention_uncompressed_limit_matches_sdpa():
    """At 8 bits the compressed attention is close to SDPA on the original K/V."""
    kq, vq = quantizer("mse", 64, 8), quantizer("mse", 64, 8, seed=1)
    q, k, v = randn(1, 4, 16, 64), randn(1, 4, 16, 64, seed=1), randn(1, 4, 16, 64, seed=2)
    got = torch.ops.tq.attention(*attention_args(q, kq, vq, k, v, 0.125, True))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ((got - expected).norm() / expected.norm()).item() < 0.02


def test_fully_masked_rows_are_zero_and_empty_cache_works():
    kq, vq = quantizer("prod", 16, 3), quantizer("mse", 16, 3, seed=1)
    q, k, v = randn(1, 2, 2, 16), randn(1, 2, 4, 16, seed=1), randn(1, 2, 4, 16, seed=2)
    mask = torch.tensor([[True] * 4, [False] * 4]).view(1, 1, 2, 4)
    out = torch.ops.tq.attention(*attention_args(q, kq, vq, k, v, 0.25, False, mask))
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all() and (out[:, :, 0] != 0).any()
    empty = torch.ops.tq.attention(*attention_args(q, kq, vq, k[:, :, :0], v[:, :, :0]))
    assert empty.shape == (1, 2, 2, 16) and (empty == 0).all()


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["mse", "prod"]), bits=st.integers(1, 5),
       kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 8]), q_len=st.integers(1, 3),
       kv_len=st.integers(1, 6), causal=st.booleans(), seed=st.integers(0, 1000))
def test_gqa_equals_repeated_key_heads(kind, bits, kv_heads, group, q_len, kv_len, causal, seed):
    kq, vq = quantizer(kind, 16, bits), quantizer("mse", 16, 4, seed=1)
    q = randn(1, kv_heads * group, q_len, 16, seed=seed)
    k, v = randn(1, kv_heads, kv_len, 16, seed=seed + 1), randn(1, kv_heads, kv_len, 16, seed=2)
    grouped = packed(kq, vq, k, v)
    repeated = packed(kq, vq, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    torch.testing.assert_close(
        torch.ops.tq.attention(*ops.attention_args(q, *grouped, 0.25, causal)),
        torch.ops.tq.attention(*ops.attention_args(q, *repeated, 0.25, causal)))
    torch.testing.assert_close(torch.ops.tq.scores(q, *grouped[0]),
                               torch.ops.tq.scores(q, *repeated[0]))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), key_kind=st.sampled_from(["mse", "prod"]), batch=st.integers(1, 2),
       kv_heads=st.integers(1, 2), group=st.sampled_from([1, 3]), q_len=st.integers(1, 4),
       kv_len=st.integers(0, 11), causal=st.booleans(),
       mask_kind=st.sampled_from([None, "bool", "float"]),
       chunk_elements=st.sampled_from([1, 40, 300, reference.CHUNK_ELEMENTS]))
def test_chunked_attention_matches_dense_float64_attention(data, key_kind, batch, kv_heads, group,
                                                           q_len, kv_len, causal, mask_kind,
                                                           chunk_elements):
    """The online softmax over key chunks (chunks of 1 key up to all keys) against the dense
    float64 formula: masks of every broadcast shape (float ones with -inf), kv_lens, causal
    (bottom-right), GQA, fully hidden rows (0)."""
    kq, vq = quantizer(key_kind, 16, 3), quantizer("mse", 16, 2, seed=1)
    seed = data.draw(st.integers(0, 1000), label="seed")
    q = randn(batch, kv_heads * group, q_len, 16, seed=seed)
    k, v = randn(batch, kv_heads, kv_len, 16, seed=seed + 1), randn(batch, kv_heads, kv_len, 16)
    mask = None
    if mask_kind is not None:
        shape = [data.draw(st.sampled_from([1, n]), label=f"mask dim {i}")
                 for i, n in enumerate((batch, kv_heads * group, q_len, kv_len))]
        mask = randn(*shape, seed=seed + 2)
        mask = mask > -0.3 if mask_kind == "bool" else mask.masked_fill(mask < -1, -math.inf)
    kv_lens = data.draw(st.none() | st.lists(st.integers(0, kv_len), min_size=batch,
                                               max_size=batch), label="kv_lens")
    kv_lens = None if kv_lens is None else torch.tensor(kv_lens)
    keys, values = packed(kq, vq, k, v)
    with mock.patch.object(reference, "CHUNK_ELEMENTS", chunk_elements):
        got = torch.ops.tq.attention(*ops.attention_args(q, keys, values, 0.4, causal, mask,
                                                         kv_lens))
    k_hat = torch.ops.tq.decompress(*keys, torch.float32).double()
    v_hat = torch.ops.tq.decompress(*values.as_keys(), torch.float32).double()
    expected = attention_float64(q, k_hat, v_hat, 0.4, causal, mask, kv_lens)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-4)


def written_cache(capacity: int, written: int, kq, vq):
    """Packed K/V buffers (1, 2, capacity, .) with `written` real tokens in front; the unwritten
    slots hold NaN norms, so reading any of them would turn the output into NaN."""
    k, v = randn(1, 2, written, 16, seed=1), randn(1, 2, written, 16, seed=2)
    fields = []
    for quant, x in ((kq, k), (vq, v)):
        for new in compress(quant, x)[:2 if quant.qjl is None else 4]:
            buffer = new.new_zeros(1, 2, capacity, new.shape[-1])
            buffer[:, :, :written] = new
            if buffer.dtype == torch.float16:
                buffer[:, :, written:] = math.nan
            fields.append(buffer)
    return k, v, fields


@pytest.mark.parametrize("causal", [False, True])
def test_attention_reads_only_up_to_kv_lens(causal):
    """Decode into a 2^20-slot cache holding 5 tokens: no temporary grows with the capacity
    (the whole call allocates less than one byte per slot; a float32 row of logits over the
    slots would be 4 MiB) and no slot past kv_lens is read (those hold NaN norms)."""
    kq, vq = quantizer("prod", 16, 3), quantizer("mse", 16, 2, seed=1)
    capacity, written = 1 << 20, 5
    k, v, (ki, kn, ks, kr, vi, vn) = written_cache(capacity, written, kq, vq)
    q = randn(1, 4, 2, 16, seed=3)
    args = (q, kq.packed_keys(ki, kn, ks, kr), vq.packed_values(vi, vn), 0.3, causal, None,
            torch.tensor([written]))
    with PeakMemory(args) as tracker:
        got = reference.attention(*args)
    assert tracker.peak < capacity, tracker.peak
    k_hat = reference.decompress(kq.packed_keys(*(t[:, :, :written] for t in (ki, kn, ks, kr))),
                                 torch.float64)
    v_hat = reference.decompress(vq.packed_keys(vi[:, :, :written], vn[:, :, :written]),
                                 torch.float64)
    expected = attention_float64(q, k_hat, v_hat, 0.3, causal, None, None)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_attention_memory_does_not_grow_with_the_keys():
    """Prefill-sized calls (16 queries x 8 heads) over 4096 and 32768 keys hold the same peak
    of temporaries, below half of one float32 logits matrix at 32768 keys (16 MiB)."""
    kq, vq = quantizer("mse", 32, 2), quantizer("mse", 32, 2, seed=1)
    q = randn(1, 8, 16, 32)
    peaks = []
    for kv_len in (4096, 32768):
        k, v = randn(1, 2, kv_len, 32, seed=1), randn(1, 2, kv_len, 32, seed=2)
        args = (q, *packed(kq, vq, k, v), 0.2, True, None, None)
        with PeakMemory(args) as tracker:
            out = reference.attention(*args)
        peaks.append(tracker.peak)
        assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert peaks[1] <= peaks[0] * 1.05 and peaks[1] <= 8 * 16 * 32768 * 4 / 2, peaks


# --------------------------------------------------------------------- edge cases

def test_zero_vectors_round_trip_to_zero():
    for kind in ("mse", "prod"):
        quant = quantizer(kind, 32, 3)
        x = torch.zeros(1, 1, 3, 32)
        x_hat = torch.ops.tq.decompress(*quant.packed_keys(*compress(quant, x)), torch.float32)
        assert torch.equal(x_hat, x)


def test_non_contiguous_inputs_match_contiguous():
    quant = quantizer("prod", 32, 3)
    base = randn(2, 5, 3, 32)  # (B, S, H, D) as projections produce it
    x = base.transpose(1, 2)
    assert not x.is_contiguous()
    for a, b in zip(compress(quant, x), compress(quant, x.contiguous())):
        assert torch.equal(a, b)
    q = randn(2, 4, 6, 32, seed=1).transpose(1, 2)
    fields = quant.packed_keys(*compress(quant, x))
    assert torch.equal(torch.ops.tq.scores(q, *fields), torch.ops.tq.scores(q.contiguous(), *fields))


def test_compress_into_writes_exactly_the_given_slots():
    quant = quantizer("prod", 16, 3)
    x = randn(2, 2, 3, 16)
    fresh = compress(quant, x)
    buffers = [torch.full((2, 2, 8, t.shape[-1]), 7).to(t.dtype) for t in fresh]
    positions = torch.tensor([5, 0, 6])
    torch.ops.tq.compress_into(x, quant.rotation, quant.centroids, quant.qjl, quant.index_bits,
                               positions, *buffers)
    untouched = torch.tensor([i not in (5, 0, 6) for i in range(8)])
    for buffer, new in zip(buffers, fresh):
        assert torch.equal(buffer[:, :, positions], new)
        assert (buffer[:, :, untouched] == 7).all()
    with pytest.raises(IndexError, match="capacity"):
        torch.ops.tq.compress_into(x, quant.rotation, quant.centroids, quant.qjl,
                                   quant.index_bits, torch.tensor([1, 8, 2]), *buffers)
    before = [b.clone() for b in buffers]
    with pytest.raises(ValueError, match="distinct"):  # which token would stay is unspecified
        torch.ops.tq.compress_into(x, quant.rotation, quant.centroids, quant.qjl,
                                   quant.index_bits, torch.tensor([3, 1, 3]), *buffers)
    assert all(torch.equal(b, old) for b, old in zip(buffers, before))


# --------------------------------------------------------------------- memory

class PeakMemory(TorchDispatchMode):
    """Tracks bytes of tensors allocated by aten ops while active (views counted once; views
    of `inputs` not at all)."""

    def __init__(self, *inputs):
        super().__init__()
        self.live = self.peak = 0
        self.owners = {t.untyped_storage().data_ptr(): 0 for t in tree_leaves(inputs)
                       if isinstance(t, torch.Tensor)}

    def _free(self, key):
        self.live -= self.owners.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.owners:
                key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if size:
                    self.owners[key] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key)
        return out


def test_scoring_memory_stays_within_twice_the_output_plus_compressed_keys():
    quant = quantizer("prod", 128, 3)
    k = randn(1, 32, 6144, 128, seed=1)
    q = randn(1, 32, 16, 128, seed=2)
    fields = compress(quant, k)
    compressed_bytes = sum(t.numel() * t.element_size() for t in fields)
    with PeakMemory() as tracker:
        out = reference.scores(q, quant.packed_keys(*fields))
    output_bytes = out.numel() * out.element_size()
    assert tracker.peak >= output_bytes  # the tracker sees the output itself
    assert tracker.peak <= 2 * output_bytes + compressed_bytes, tracker.peak / 2**20


# --------------------------------------------------------------------- torch.compile

def test_compile_fullgraph_dynamic_matches_eager_without_recompiling():
    kq, vq = quantizer("prod", 32, 3), quantizer("mse", 32, 3, seed=1)

    def step(q, k, v):
        kf, vf = compress(kq, k), compress(vq, v)
        scores = torch.ops.tq.scores(q, *kq.packed_keys(*kf))
        out = torch.ops.tq.attention(*ops.attention_args(q, kq.packed_keys(*kf),
                                                         vq.packed_values(*vf[:2]), 0.2, True))
        return scores, out

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for seq in (7, 12, 19):
        q, k, v = randn(1, 4, 3, 32), randn(1, 2, seq, 32, seed=seq), randn(1, 2, seq, 32, seed=1)
        for got, expected in zip(compiled(q, k, v), step(q, k, v)):
            assert torch.equal(got, expected)
    assert counter.frame_count == 1


# ------------------------------------------------------- norm range (exponent-safe)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel: interpreter on CPU


def kernel_compress(x, quant, norm_dtype):
    """The Triton compress kernel (interpreted on CPU), called directly as
    tests/test_kernel_compress.py does, on DEVICE."""
    from tq_ops.kernels import compress as kernels
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = kernels.compress(x.to(DEVICE), dev(quant.rotation), dev(quant.centroids),
                           dev(quant.qjl), quant.index_bits, norm_dtype)
    return [t.cpu() for t in out]


def reference_compress(x, quant, norm_dtype):
    return reference.compress(x, quant.rotation, quant.centroids, quant.qjl, quant.index_bits,
                              norm_dtype)


@pytest.mark.parametrize("impl", [reference_compress, kernel_compress], ids=["reference", "kernel"])
@pytest.mark.parametrize("dtype,norm_dtype,exponents", [
    (torch.float32, torch.float32, (-110, -100, -70, -30, 0, 30, 70, 100, 123)),
    (torch.bfloat16, torch.bfloat16, (-110, -70, 0, 70, 123)),
    (torch.float32, torch.float16, (-12, -5, 0, 7, 13))])
@pytest.mark.parametrize("kind", ["mse", "prod"])
def test_norms_have_full_precision_across_the_storable_range(impl, dtype, norm_dtype,
                                                              exponents, kind):
    """x * 2^e over the whole range the norm dtype stores (norms of x about 4-7): the norm
    is within one norm_dtype ulp of the float64 norm, and the codes and signs are those of x
    (power-of-two scaling is exact). Squaring unscaled coordinates gave 0 (or subnormal
    garbage) below 2^-64 and inf above 2^64."""
    quant = quantizer(kind, 32, 3)
    x = randn(1, 1, 3, 32, dtype=dtype)
    base = impl(x, quant, norm_dtype)
    for e in exponents:
        scaled = x * 2.0 ** e
        assert torch.equal(scaled.double(), x.double() * 2.0 ** e)  # no rounding in the input
        out = impl(scaled, quant, norm_dtype)
        truth = torch.linalg.vector_norm(scaled.double(), dim=-1, keepdim=True)
        error = (out[1].double() - truth).abs() / truth
        assert (error <= torch.finfo(norm_dtype).eps).all(), (e, error.max())
        assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2]), e


@pytest.mark.parametrize("impl", [reference_compress, kernel_compress], ids=["reference", "kernel"])
def test_zero_vectors_stay_exact_beside_tiny_and_huge_ones(impl):
    quant = quantizer("prod", 16, 2)
    x = torch.zeros(1, 1, 3, 16)
    x[0, 0, 0, 3], x[0, 0, 2, :] = 3e-38, 1e37
    out = impl(x, quant, torch.float32)
    assert out[1][0, 0, 1].item() == 0 and torch.equal(out[0][0, 0, 1], torch.zeros_like(out[0][0, 0, 1]))
    truth = torch.linalg.vector_norm(x.double(), dim=-1)[0, 0]
    assert torch.allclose(out[1][0, 0, :, 0].double()[[0, 2]], truth[[0, 2]], rtol=2 ** -22)


def test_compiled_raw_ops_store_what_they_compute():
    """Compiled graphs cannot raise on values (no host sync): compress stores the NaN norm of
    a NaN vector and the inf of a norm beyond float16, as README says; eagerly both raise."""
    quant = quantizer("mse", 16, 3)
    x = randn(1, 1, 3, 16)
    x[0, 0, 1, 2], x[0, 0, 2] = math.nan, 1e5
    compiled = torch.compile(lambda x: compress(quant, x), backend="inductor", fullgraph=True)
    norms = compiled(x)[1].flatten()
    assert torch.isfinite(norms[0]) and norms[1].isnan() and norms[2] == math.inf
    with pytest.raises(ValueError, match="non-finite"):
        compress(quant, x)
