"""The Triton readers of the packed cache (decompress, scores, attention) under TRITON_INTERPRET.

The kernels run on CPU tensors through the Triton interpreter on tiny shapes and are
compared with `tq_ops.reference` on fresh random data. tests/conftest.py switches the
interpreter on before triton is imported; on a machine with a GPU tests/gpu covers the kernels.
`tq::attention`'s CUDA route (`ops.py`: fused kernel or prefill by decompression) is forced
onto CPU tensors here by `cuda_route`.
"""

import contextlib

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from conftest import ULP, float64_reconstruction, within_an_ulp
from triton.runtime.interpreter import InterpretedFunction

from tq_ops import ops, reference
from tq_ops.codebook import lloyd_max
from tq_ops.kernels import attention as attention_kernels
from tq_ops.kernels import decompress as decompress_kernels
from tq_ops.kernels import prefill
from tq_ops.kernels import scores as scores_kernels
from tq_ops.packed import PackedKeys, PackedValues, named
from tq_ops.rotation import haar_rotation, qjl_matrix

# tests/conftest.py turns the interpreter on when there is no GPU; tests/gpu covers a GPU.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests/gpu covers the kernels")
assert torch.cuda.is_available() or isinstance(attention_kernels._attention_kernel, InterpretedFunction)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere counts as failure)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def cuda_route():
    """Within: `tq::attention` on CPU tensors takes the route it takes on CUDA (ops.py), the
    kernels running in the interpreter. Yields the list of routes taken, "prefill" (by
    decompression) or "fused", one per call."""
    taken = []

    def recorded(name, fn):
        def run(*args, **kwargs):
            taken.append(name)
            return fn(*args, **kwargs)
        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "_use_triton", lambda *args, **kwargs: True)
        patch.setattr(prefill, "flash_prefill", recorded("prefill", prefill.flash_prefill))
        patch.setattr(attention_kernels, "fused_attention",
                      recorded("fused", attention_kernels.fused_attention))
        yield taken


def packed(gen, batch, heads, length, dim, index_bits, prod, seed=0) -> PackedKeys:
    """Random vectors compressed by the reference, with their constants.

    `index_bits` is the bit width of the codes; Prod keys add a QJL matrix with qjl_dim = dim.
    """
    x = torch.randn(batch, heads, length, dim, generator=gen)
    x = x * (0.5 + torch.rand(batch, heads, length, 1, generator=gen) * 2)
    rotation = haar_rotation(dim, seed)
    centroids = lloyd_max(dim, index_bits).float()
    qjl = qjl_matrix(dim, dim, seed) if prod else None
    idx, norms, signs, rnorms = reference.compress(x, rotation, centroids, qjl, index_bits,
                                                   torch.float16)
    if not prod:
        signs = rnorms = None
    return PackedKeys(idx, norms, signs, rnorms, rotation, centroids, qjl, index_bits)


def packed_values(gen, batch, heads, length, dim, index_bits, seed=0) -> PackedValues:
    """`packed` MSE vectors as values."""
    return named(PackedValues, packed(gen, batch, heads, length, dim, index_bits, False,
                                      seed)._asdict())


@pytest.mark.parametrize("dim,index_bits,prod", [(64, 4, False), (64, 3, True), (80, 2, True),
                                           (64, 1, False), (96, 8, False)])
def test_decompress(dim, index_bits, prod):
    gen = torch.Generator().manual_seed(dim * 10 + index_bits)
    keys = packed(gen, 2, 2, 5, dim, index_bits, prod)
    out = decompress_kernels.decompress(keys, torch.float32)
    ref = reference.decompress(keys, torch.float32)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5


@settings(max_examples=10, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(st.integers(1, 150), st.sampled_from([16, 64, 80, 96, 128, 256]), st.integers(1, 8),
       st.booleans(), st.sampled_from(list(ULP)), st.integers(0, 2**16))
def test_decompress_fuzz_against_float64(length, dim, index_bits, prod, dtype, seed):
    """Every element within one output ulp of the float64 reconstruction (`within_an_ulp`), for
    any length (several 64-row tiles per program from 129 rows on), head_dim, bit width and
    output dtype. (No shrinking: each interpreted example takes seconds.)"""
    gen = torch.Generator().manual_seed(seed)
    keys = packed(gen, 1, 2, length, dim, index_bits, prod, seed)
    out = decompress_kernels.decompress(keys, dtype)
    truth = float64_reconstruction(keys)
    assert out.shape == truth.shape and out.dtype == dtype
    assert within_an_ulp(out, truth)


@pytest.mark.parametrize("group,index_bits,prod,dtype", [(1, 4, False, torch.float32),
                                                   (4, 3, True, torch.float16),
                                                   (4, 2, True, torch.bfloat16)])
def test_scores(group, index_bits, prod, dtype):
    gen = torch.Generator().manual_seed(group * 100 + index_bits)
    keys = packed(gen, 2, 2, 70, 64, index_bits, prod)
    query = torch.randn(2, 2 * group, 3, 64, generator=gen).to(dtype)
    out = scores_kernels.scores(query, keys)
    ref = reference.scores(query.float(), keys)
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 4e-3  # output rounding of fp16 / bf16 logits
    assert rel_err(out, ref) < tol


def attention_case(gen, *, batch=2, kv_heads=2, group=4, q_len=1, kv_len=150, dim=64,
                   k_index_bits=3, k_prod=True, v_index_bits=4, dtype=torch.float16,
                   is_causal=False, mask=None, kv_lens=None, tune=None):
    keys = packed(gen, batch, kv_heads, kv_len, dim, k_index_bits, k_prod, 1)
    values = packed_values(gen, batch, kv_heads, kv_len, dim, v_index_bits, 2)
    query = (torch.randn(batch, kv_heads * group, q_len, dim, generator=gen) * 2).to(dtype)
    args = (keys, values, dim ** -0.5, is_causal, mask, kv_lens)
    out = attention_kernels.fused_attention(query, *args, tune=tune)
    ref = reference.attention(query.float(), *args)
    assert out.shape == ref.shape and out.dtype == dtype
    return out, ref


@pytest.mark.parametrize("group,k_index_bits,k_prod,v_index_bits",
                         [(1, 3, True, 4), (4, 4, False, 3), (4, 2, True, 2)])
def test_attention_decode_ragged(group, k_index_bits, k_prod, v_index_bits):
    gen = torch.Generator().manual_seed(7 * group + k_index_bits)
    kv_lens = torch.tensor([150, 61])
    out, ref = attention_case(gen, group=group, k_index_bits=k_index_bits, k_prod=k_prod,
                              v_index_bits=v_index_bits, kv_lens=kv_lens)
    assert rel_err(out, ref) < 2e-3


def test_attention_op_runs_decode_fused():
    """`tq::attention`'s CUDA route sends decode (4 query rows per KV head) to the fused
    kernel, with the op's arguments in place."""
    gen = torch.Generator().manual_seed(23)
    keys = packed(gen, 1, 2, 40, 32, 3, True, 1)
    values = packed_values(gen, 1, 2, 40, 32, 2, 2)
    query = torch.randn(1, 8, 1, 32, generator=gen).half()
    args = (keys, values, 0.2, False, None, torch.tensor([33]))
    with cuda_route() as taken:
        out = torch.ops.tq.attention(*ops.attention_args(query, *args))
    assert taken == ["fused"]
    assert rel_err(out, reference.attention(query.float(), *args)) < 2e-3


def test_attention_many_splits_merge_in_blocks():
    """70 key splits of 16 keys (the merge takes 32 per step) with one sequence ending early,
    so whole splits hold no keys: the merge must weigh them by zero, not NaN."""
    gen = torch.Generator().manual_seed(5)
    cfg = attention_kernels.config(2, 2, 4, 1111, torch.device("cpu"),
                                   dict(BLOCK_N=16, resident=1000))
    assert cfg["splits"] == 70
    out, ref = attention_case(gen, kv_len=1111, k_index_bits=4, k_prod=False,
                              kv_lens=torch.tensor([1111, 300]),
                              tune=dict(BLOCK_N=16, resident=1000))
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("lengths", [[300, 0], [17, 1111]])
def test_splits_past_the_length_write_nothing_and_the_merge_skips_them(monkeypatch, lengths):
    """Decode programs whose key split starts past their row's kv_lens return at once; the merge
    reads only the cdiv(length, chunk) splits that were written. Every buffer the launcher
    allocates starts as NaN, so reading an unwritten partial would poison the output."""
    gen = torch.Generator().manual_seed(6)
    keys = packed(gen, 2, 2, 1111, 64, 4, False, 1)
    values = packed_values(gen, 2, 2, 1111, 64, 3, 2)
    query = torch.randn(2, 8, 1, 64, generator=gen).half()
    args = (keys, values, 0.125, False, None, torch.tensor(lengths))
    empty = torch.empty

    def nan_empty(*shape, **kwargs):
        out = empty(*shape, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    out = attention_kernels.fused_attention(query, *args, tune=dict(BLOCK_N=16, resident=1000))
    monkeypatch.undo()
    ref = reference.attention(query.float(), *args)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-3
    assert torch.equal(out[lengths.index(min(lengths))].float().abs().sum() == 0,
                       torch.tensor(min(lengths) == 0))


@pytest.mark.parametrize("batch,length,splits", [(1, 131072, 64), (3, 32768, 22), (8, 8192, 8),
                                                 (8, 131072, 8), (16, 32768, 4), (22, 32768, 3),
                                                 (32, 32768, 2), (64, 8192, 1), (100, 8192, 1)])
def test_decode_splits_fill_one_wave(monkeypatch, batch, length, splits):
    """GPU decode (132 SMs, 4 programs each, 8 KV heads): as many key splits as fit in one
    wave of programs, never a partial second wave (9 splits at batch 8 would launch
    8 x 8 x 9 = 576 > 528 programs); 128-key chunks may round the count down."""
    monkeypatch.setattr(attention_kernels, "num_sms", lambda device: 132)
    cfg = attention_kernels.config(batch, 8, 4, length, torch.device("cuda"))
    assert cfg["splits"] == splits
    assert cfg["chunk"] % 128 == 0 and cfg["chunk"] * splits >= length
    assert batch * 8 * splits <= max(528, batch * 8)


def test_attention_1_bit_keys_and_8_bit_values():
    """Single-plane codes of 8 lanes (1-bit keys) and of 1 lane (8-bit values)."""
    gen = torch.Generator().manual_seed(3)
    out, ref = attention_case(gen, k_index_bits=1, k_prod=False, v_index_bits=8,
                              kv_lens=torch.tensor([150, 9]))
    assert rel_err(out, ref) < 2e-3


def test_attention_causal_chunk_with_offset():
    """A continuation chunk of 5 queries at the end of 150 keys, GQA 4, two KV splits."""
    gen = torch.Generator().manual_seed(11)
    out, ref = attention_case(gen, q_len=5, is_causal=True, kv_lens=torch.tensor([150, 90]))
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("k_prod,v_index_bits,q_len", [(True, 4, 1), (False, 3, 5)])
def test_attention_deferred_softmax_sums(k_prod, v_index_bits, q_len):
    """DEFER_SUM (GPU decode with Prod keys or non-4-bit values) keeps per-key partial sums and
    reduces them after the loop: ragged lengths (whole splits empty) and a causal chunk whose
    rows see different key counts, over several 64-key tiles per program."""
    gen = torch.Generator().manual_seed(13 + q_len)
    tune = dict(BLOCK_N=64, DEFER_SUM=True, resident=1)  # one split: 3 tiles in a loop
    out, ref = attention_case(gen, q_len=q_len, is_causal=q_len > 1, k_prod=k_prod,
                              v_index_bits=v_index_bits, kv_lens=torch.tensor([150, 40]), tune=tune)
    assert rel_err(out, ref) < 2e-3


def test_attention_prefill_bf16_dim80():
    gen = torch.Generator().manual_seed(12)
    out, ref = attention_case(gen, batch=1, kv_heads=1, q_len=40, kv_len=40, dim=80,
                              is_causal=True, dtype=torch.bfloat16)
    assert rel_err(out, ref) < 2e-3 + 4e-3  # plus bf16 output rounding


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 2), st.sampled_from([1, 2, 4]), st.integers(17, 40), st.booleans(),
       st.sampled_from([16, 48, 64]), st.integers(1, 4), st.booleans(), st.integers(1, 4),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.integers(0, 99))
def test_flash_prefill(batch, group, q_len, is_causal, dim, k_index_bits, k_prod, v_index_bits,
                       dtype, seed):
    """`tq::attention` takes prefill by decompression + SDPA for such calls and matches the
    reference on random shapes, code widths and query dtypes."""
    gen = torch.Generator().manual_seed(seed)
    kv_len = q_len if is_causal else int(torch.randint(1, 60, (), generator=gen))
    keys = packed(gen, batch, 2, kv_len, dim, k_index_bits, k_prod, 1)
    values = packed_values(gen, batch, 2, kv_len, dim, v_index_bits, 2)
    query = (torch.randn(batch, 2 * group, q_len, dim, generator=gen) * 2).to(dtype)
    args = (keys, values, dim ** -0.5, is_causal, None, None)
    assert prefill.flash_prefill_applies(query, keys, values, None, None)
    with cuda_route() as taken:
        out = torch.ops.tq.attention(*ops.attention_args(query, *args))
    assert taken == ["prefill"]
    ref = reference.attention(query.float(), *args)
    slack = {torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float32: 0.0}[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < 3e-3 + slack


def test_flash_prefill_serves_prefills_with_bool_or_no_mask():
    """Decode, float masks, fp32 norms and prefills into a cache of at least twice as many
    slots as queries (kv_lens) stay fused; bool masks, ragged lengths and causal chunks go to
    decompression + SDPA."""
    query = torch.zeros(1, 8, 32, 64, dtype=torch.float16)
    idx, norms = torch.zeros(1, 2, 32, 24, dtype=torch.uint8), torch.ones(1, 2, 32, 1).half()
    rot, cent = torch.eye(64), torch.zeros(8)
    values = PackedValues(idx, norms, rot, cent, 3)

    def applies(q=query, k_norms=norms, mask=None, kv_lens=None):
        keys = PackedKeys(idx, k_norms, None, None, rot, cent, None, 3)
        return prefill.flash_prefill_applies(q, keys, values, mask, kv_lens)
    assert applies() and applies(mask=torch.ones(32, 32, dtype=torch.bool))
    assert applies(q=query[:, :, :17], kv_lens=torch.tensor([32]))  # 32 < 2 x 17 slots
    assert not applies(q=query[:, :, :16], kv_lens=torch.tensor([32]))
    assert applies(q=query[:, :, :16])  # no kv_lens: every slot is a key
    assert not applies(q=query[:, :, :4])  # decode: 16 rows per KV head
    assert not applies(mask=torch.zeros(32, 32))
    assert not applies(k_norms=norms.float())


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.sampled_from([1, 2, 4]), st.integers(17, 40), st.integers(0, 16),
       st.booleans(), st.sampled_from(["none", "shared", "per-head"]), st.booleans(),
       st.sampled_from([torch.float16, torch.bfloat16]), st.integers(0, 99))
def test_flash_prefill_masks_lengths_and_chunks(batch, group, q_len, extra_keys, is_causal,
                                                mask_kind, ragged, dtype, seed):
    """Decompression + SDPA per group head under every `tq::attention` masking rule: a bool
    mask shared by all heads or per query head, ragged kv_lens, a causal chunk aligned
    bottom-right; rows that see no key give zeros."""
    gen = torch.Generator().manual_seed(seed)
    kv_len = q_len + extra_keys
    keys = packed(gen, batch, 2, kv_len, 32, 3, False, 1)
    values = packed_values(gen, batch, 2, kv_len, 32, 2, 2)
    query = (torch.randn(batch, 2 * group, q_len, 32, generator=gen) * 2).to(dtype)
    heads = 2 * group if mask_kind == "per-head" else 1
    mask = None
    if mask_kind != "none":
        mask = torch.rand(batch, heads, q_len, kv_len, generator=gen) > 0.3
        mask[..., 0, :] = False  # an empty row
    kv_lens = torch.randint(0, kv_len + 1, (batch,), generator=gen) if ragged else None
    args = (keys, values, 32 ** -0.5, is_causal, mask, kv_lens)
    assert prefill.flash_prefill_applies(query, *args[:2], mask, kv_lens)
    with cuda_route() as taken:
        out = torch.ops.tq.attention(*ops.attention_args(query, *args))
    assert taken == ["prefill"]
    ref = reference.attention(query.float(), *args)
    assert out.dtype == dtype and out.shape == ref.shape
    empty = (ref == 0).all(-1)
    assert (out[empty] == 0).all()
    assert rel_err(out, ref) < 3e-3 + {torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_explicit_mask_and_empty_rows(kind):
    gen = torch.Generator().manual_seed(13)
    q_len, kv_len = 3, 70
    keep = torch.rand(2, 1, q_len, kv_len, generator=gen) > 0.3
    keep[1, :, 0] = False  # a fully masked row must give zeros
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(keep.shape, generator=gen),
                                                   float("-inf"))
    out, ref = attention_case(gen, q_len=q_len, kv_len=kv_len, mask=mask, dtype=torch.float32,
                              kv_lens=torch.tensor([70, 0]) if kind == "float" else None)
    assert rel_err(out, ref) < 2e-3
    assert out[1, :, 0].abs().max() == 0


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_attention_mask_shared_by_all_rows(kind, q_len):
    """A (B, 1, 1, Lk) mask (a decode or padding mask) is read once per key (MASK_KEYS) and
    applied to every head and query row, with kv_lens; a sequence it hides gives zeros."""
    gen = torch.Generator().manual_seed(19 + q_len)
    keep = torch.rand(2, 1, 1, 150, generator=gen) > 0.4
    keep[1] = False
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(keep.shape, generator=gen),
                                                   float("-inf"))
    out, ref = attention_case(gen, q_len=q_len, mask=mask, dtype=torch.float32,
                              kv_lens=torch.tensor([120, 150]))
    assert rel_err(out, ref) < 2e-3
    assert out[1].abs().max() == 0 and out[0].abs().min() > 0


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_skips_tiles_the_mask_hides(kind):
    """SKIP_EMPTY (prefill) skips key tiles that the mask hides for every row of a query
    tile: a causal mask with a hidden 64-key band and a hidden row, 64-key tiles."""
    gen = torch.Generator().manual_seed(17)
    q_len, kv_len = 40, 150
    keep = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    keep[:, :, :, 64:128] = False
    keep[1, :, 3] = False
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(keep.shape, generator=gen),
                                                   float("-inf"))
    out, ref = attention_case(gen, group=2, q_len=q_len, kv_len=kv_len, mask=mask,
                              dtype=torch.float32, tune=dict(BLOCK_N=64, SKIP_EMPTY=True))
    assert rel_err(out, ref) < 2e-3
    assert out[1, :, 3].abs().max() == 0

