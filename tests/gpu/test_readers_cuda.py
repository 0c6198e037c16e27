"""CUDA tests of the packed-cache readers: decompress, scores and fused attention.

Every kernel result is compared with the CPU reference (`tq_ops.reference`, float32) on
fresh random data; outputs are allocated from poisoned (NaN-filled) memory and must come
back finite. Also: opcheck, Inductor code inspection and CUDA-graph replay.
"""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from torch.utils._pytree import tree_map  # noqa: E402

from conftest import cuda_graph, float64_reconstruction, within_an_ulp  # noqa: E402
from tq_ops import ops, reference  # noqa: E402
from tq_ops.codebook import full_table, half_table, lloyd_max  # noqa: E402
from tq_ops.packed import PackedKeys, PackedValues, named  # noqa: E402
from tq_ops.rotation import haar_rotation, qjl_matrix  # noqa: E402

CUDA = torch.device("cuda")


def poison():
    """Fill the caching allocator's free memory with NaN so unwritten outputs show up."""
    torch.cuda.synchronize()
    blob = torch.empty(1 << 28, device=CUDA)
    blob.fill_(float("nan"))
    del blob


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def packed(gen, batch, heads, length, dim, index_bits, prod, seed) -> PackedKeys:
    """Reference-compressed random vectors with their constants, CPU; the codebook as its
    upper half, as quantizers pass it."""
    x = torch.randn(batch, heads, length, dim, generator=gen)
    x = x * (0.5 + 2 * torch.rand(batch, heads, length, 1, generator=gen))
    rotation, centroids = haar_rotation(dim, seed), half_table(lloyd_max(dim, index_bits).float())
    qjl = qjl_matrix(dim, dim, seed) if prod else None
    idx, norms, signs, rnorms = reference.compress(x, rotation, centroids, qjl, index_bits,
                                                   torch.float16)
    return PackedKeys(idx, norms, signs if prod else None, rnorms if prod else None, rotation,
                      centroids, qjl, index_bits)


def to(obj, device=CUDA):
    """obj (a tensor, or tuples and packed tuples of them) with every tensor on `device`."""
    return tree_map(lambda a: a.to(device) if isinstance(a, torch.Tensor) else a, obj)


def attention_case(seed, *, batch, kv_heads, group, q_len, kv_len, dim, k_index_bits, k_prod,
                   v_index_bits, dtype, is_causal, mask=None, kv_lens=None):
    """(query, PackedKeys, PackedValues, scale, is_causal, mask, kv_lens), CPU."""
    gen = torch.Generator().manual_seed(seed)
    keys = packed(gen, batch, kv_heads, kv_len, dim, k_index_bits, k_prod, 1)
    values = named(PackedValues, packed(gen, batch, kv_heads, kv_len, dim, v_index_bits, False,
                                        2)._asdict())
    query = (torch.randn(batch, kv_heads * group, q_len, dim, generator=gen) * 2).to(dtype)
    return (query, keys, values, dim ** -0.5, is_causal, mask, kv_lens)


def check_attention(case, tol=2e-3):
    ref = reference.attention(case[0].float(), *case[1:])
    poison()
    out = torch.ops.tq.attention(*ops.attention_args(*to(case)))
    assert out.dtype == case[0].dtype and out.shape == ref.shape
    slack = {torch.float32: 0, torch.float16: 1e-3, torch.bfloat16: 4e-3}[case[0].dtype]
    err = rel_err(out, ref)
    assert err < tol + slack, err


@pytest.mark.parametrize("dim,group,k_index_bits,k_prod,v_index_bits", [
    (64, 1, 3, True, 4), (64, 8, 4, False, 3), (80, 4, 3, True, 4), (96, 4, 2, True, 3),
    (96, 1, 4, False, 3), (128, 4, 3, True, 4), (128, 8, 2, True, 3), (128, 1, 1, False, 8),
    (256, 4, 4, False, 3), (256, 8, 3, True, 4)])
def test_decode_ragged(dim, group, k_index_bits, k_prod, v_index_bits):
    lens = torch.tensor([1500, 37, 0, 801])
    case = attention_case(dim + group + k_index_bits, batch=4, kv_heads=2, group=group, q_len=1,
                          kv_len=1500, dim=dim, k_index_bits=k_index_bits, k_prod=k_prod,
                          v_index_bits=v_index_bits, dtype=torch.float16, is_causal=False,
                          kv_lens=lens)
    check_attention(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("q_len", [4, 200])
def test_causal_chunk_with_offset(dtype, q_len):
    case = attention_case(q_len, batch=2, kv_heads=2, group=4, q_len=q_len, kv_len=700,
                          dim=128, k_index_bits=3, k_prod=True, v_index_bits=4, dtype=dtype,
                          is_causal=True, kv_lens=torch.tensor([700, 333]))
    check_attention(case)


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("custom", ["keys", "values"])
def test_other_4bit_codebooks(custom, whole):
    """The 4-bit PTX decodes any symmetric codebook given as its upper half, from words built
    in the kernel (a rescaled Lloyd-Max half here); a whole, asymmetric table takes the gather
    path (a wrong decode would fail the comparison)."""
    query, keys, values, *rest = attention_case(
        20, batch=2, kv_heads=2, group=4, q_len=1, kv_len=900, dim=128, k_index_bits=4,
        k_prod=False, v_index_bits=4, dtype=torch.float16, is_causal=False,
        kv_lens=torch.tensor([900, 417]))

    def custom_table(half):
        if whole:
            return full_table(half, 4) * torch.linspace(0.8, 1.2, 16)
        return half * torch.linspace(0.9, 1.3, 8)

    if custom == "keys":
        keys = keys._replace(centroids=custom_table(keys.centroids))
    else:
        values = values._replace(centroids=custom_table(values.centroids))
    check_attention((query, keys, values, *rest))


@pytest.mark.parametrize("dim", [64, 80, 128])
def test_prefill_causal(dim):
    """The op (decompression + SDPA for such a prefill) and the fused kernel both match."""
    from tq_ops.kernels import attention as kernels
    from tq_ops.kernels import prefill
    case = attention_case(dim, batch=1, kv_heads=2, group=4, q_len=512, kv_len=512, dim=dim,
                          k_index_bits=3, k_prod=False, v_index_bits=3, dtype=torch.float16,
                          is_causal=True)
    query, keys, values = case[:3]
    assert prefill.flash_prefill_applies(query, keys, values, None, None)  # the op's route
    check_attention(case)
    ref = reference.attention(query.float(), *case[1:])
    assert rel_err(kernels.fused_attention(*to(case)), ref) < 3e-3


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_explicit_masks(kind):
    gen = torch.Generator().manual_seed(5)
    keep = torch.rand(2, 8, 3, 300, generator=gen) > 0.5
    keep[0, 1, 2] = False
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(keep.shape, generator=gen),
                                                   -math.inf)
    case = attention_case(6, batch=2, kv_heads=2, group=4, q_len=3, kv_len=300, dim=128,
                          k_index_bits=3, k_prod=True, v_index_bits=4, dtype=torch.float32,
                          is_causal=False, mask=mask)
    check_attention(case)


@pytest.mark.parametrize("dim,index_bits,prod", [(128, 3, True), (64, 4, False), (96, 2, True),
                                           (256, 3, False), (80, 1, True)])
@pytest.mark.parametrize("group", [1, 4])
def test_scores(dim, index_bits, prod, group):
    gen = torch.Generator().manual_seed(dim + index_bits)
    keys = packed(gen, 2, 2, 333, dim, index_bits, prod, 3)
    query = torch.randn(2, 2 * group, 5, dim, generator=gen)
    ref = reference.scores(query, keys)
    poison()
    out = torch.ops.tq.scores(*to((query, *keys)))
    assert rel_err(out, ref) < 1e-3


@pytest.mark.parametrize("dim,index_bits,prod", [(128, 3, True), (64, 4, False), (80, 8, False)])
def test_decompress(dim, index_bits, prod):
    gen = torch.Generator().manual_seed(dim * index_bits)
    keys = packed(gen, 2, 3, 257, dim, index_bits, prod, 4)
    ref = reference.decompress(keys, torch.float32)
    poison()
    out = torch.ops.tq.decompress(*to((*keys, torch.float32)))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dim,index_bits,prod,dtype", [(128, 4, False, torch.float16),
                                                 (128, 3, True, torch.bfloat16),
                                                 (256, 3, True, torch.float16),
                                                 (96, 2, False, torch.float32),
                                                 (256, 8, False, torch.bfloat16)])
def test_decompress_within_an_ulp_of_float64(dim, index_bits, prod, dtype):
    """Several tiles per program and every output dtype: within one output ulp of the float64
    reconstruction (`within_an_ulp`)."""
    gen = torch.Generator().manual_seed(dim + index_bits)
    keys = packed(gen, 2, 4, 3000, dim, index_bits, prod, 6)
    truth = float64_reconstruction(keys)
    poison()
    out = torch.ops.tq.decompress(*to((*keys, dtype)))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert within_an_ulp(out, truth)


def test_head_dim_above_256_runs_the_reference_on_the_gpu():
    """head_dim 512 is outside the kernels' range (`ops._use_triton`): the ops still answer,
    through the reference on the GPU, and agree with it on the CPU."""
    gen = torch.Generator().manual_seed(512)
    keys = packed(gen, 1, 2, 40, 512, 3, True, 8)
    assert rel_err(torch.ops.tq.decompress(*to((*keys, torch.float32))),
                   reference.decompress(keys, torch.float32)) < 1e-5
    query = torch.randn(1, 4, 1, 512, generator=gen)
    assert rel_err(torch.ops.tq.scores(*to((query, *keys))),
                   reference.scores(query, keys)) < 1e-5


def test_opcheck():
    gen = torch.Generator().manual_seed(9)
    key = tuple(to(packed(gen, 1, 2, 70, 64, 3, True, 5)))
    query = torch.randn(1, 4, 2, 64, generator=gen).to(CUDA)
    torch.library.opcheck(torch.ops.tq.decompress.default, key + (torch.float16,))
    torch.library.opcheck(torch.ops.tq.scores.default, (query,) + key)
    case = attention_case(10, batch=1, kv_heads=2, group=2, q_len=2, kv_len=70, dim=64,
                          k_index_bits=3, k_prod=True, v_index_bits=4, dtype=torch.float16,
                          is_causal=True, kv_lens=torch.tensor([50]))
    torch.library.opcheck(torch.ops.tq.attention.default, ops.attention_args(*to(case)))


def test_inductor_sees_the_kernels():
    from torch._inductor.utils import run_and_get_code

    case = attention_case(11, batch=2, kv_heads=2, group=4, q_len=1, kv_len=2048, dim=128,
                          k_index_bits=3, k_prod=True, v_index_bits=4, dtype=torch.float16,
                          is_causal=False, kv_lens=torch.tensor([2048, 1000]))

    def step(query, keys, values, *rest):
        logits = torch.ops.tq.scores(query, *keys)
        return (torch.ops.tq.attention(*ops.attention_args(query * 1.0, keys, values, *rest)),
                logits.sum())

    compiled = torch.compile(step, fullgraph=True)
    (out, _), codes = run_and_get_code(compiled, *to(case))
    source = "\n".join(codes)
    for name in ("_attention_kernel", "_merge_kernel", "_scores_kernel"):
        assert name in source, name
    ref = reference.attention(case[0].float(), *case[1:])
    assert rel_err(out, ref) < 3e-3


def test_cuda_graph_replay_with_new_lengths():
    case = to(attention_case(12, batch=3, kv_heads=2, group=4, q_len=1, kv_len=3000, dim=128,
                             k_index_bits=3, k_prod=True, v_index_bits=4, dtype=torch.float16,
                             is_causal=True, kv_lens=torch.tensor([10, 10, 10])))
    lens = case[-1]
    graph, out = cuda_graph(torch.ops.tq.attention, *ops.attention_args(*case))
    for new in ([3000, 1, 1234], [7, 2999, 0]):
        lens.copy_(torch.tensor(new))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        host = to(case, "cpu")
        ref = reference.attention(host[0].float(), *host[1:])
        assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim,k_index_bits,v_index_bits,q_len,mask", [
    (128, 4, 3, 1, None), (128, 4, 4, 4, "bool"), (64, 3, 2, 1, "float"), (256, 4, 3, 2, None)])
def test_exact_tokens_in_decode_and_under_cuda_graphs(dtype, dim, k_index_bits, v_index_bits,
                                                      q_len, mask):
    """Decode with 4 sink and 128 window tokens read exact (`ExactTokens`, in the query dtype)
    against the reference, row lengths from 0 to past the window; then CUDA-graph replays
    with new lengths and window starts."""
    from tq_ops.packed import ExactTokens

    gen = torch.Generator().manual_seed(dim + q_len)
    lens = torch.tensor([2000, 100, 0, 1333])
    masks_by_kind = {"bool": torch.rand(4, 1, q_len, 2000, generator=gen) > 0.1,
                     "float": torch.randn(4, 8, q_len, 2000, generator=gen)}
    case = attention_case(dim, batch=4, kv_heads=2, group=4, q_len=q_len, kv_len=2000, dim=dim,
                          k_index_bits=k_index_bits, k_prod=False, v_index_bits=v_index_bits,
                          dtype=dtype, is_causal=q_len > 1, mask=masks_by_kind.get(mask),
                          kv_lens=lens)
    exact = ExactTokens(torch.randn(4, 2, 132, dim, generator=gen).to(dtype),
                        torch.randn(4, 2, 132, dim, generator=gen).to(dtype),
                        (lens - 128).clamp(min=0), 4)
    case = case + (exact,)
    ref = reference.attention(case[0].float(), *case[1:])
    assert rel_err(ref, reference.attention(case[0].float(), *case[1:-1])) > 0.05
    poison()
    on_gpu = to(case)
    graph, out = cuda_graph(torch.ops.tq.attention, *ops.attention_args(*on_gpu))
    assert rel_err(out, ref) < 4e-3
    for new in ([1, 2000, 129, 5], [300, 0, 2000, 4]):
        on_gpu[6].copy_(torch.tensor(new))
        on_gpu[7].start.copy_((torch.tensor(new) - 128).clamp(min=0))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        host = to(on_gpu, "cpu")
        assert rel_err(out, reference.attention(host[0].float(), *host[1:])) < 4e-3
