"""Sink and window tokens read in full precision (`ExactTokens`): `tq::attention` (reference and
fused kernel under the interpreter) against a float64 oracle, `tq::read_cache`, and
`TurboQuantCache(sinks=, window=)` (buffers, eager = compiled, decode = the eval tool's
simulation)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import compress, quantizer
from tq_ops import masks, ops, reference
from tq_ops.kernels import attention as attention_kernels
from tq_ops.packed import ExactTokens

transformers = pytest.importorskip("transformers")
from tq_ops.cache import TurboQuantCache
from test_cache import SMALL, tiny_llama


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def packed_pair(kind, k_bits, v_bits, batch, heads, length, dim, seed=0):
    kq, vq = quantizer(kind, dim, k_bits), quantizer("mse", dim, v_bits, seed=1)
    k, v = randn(batch, heads, length, dim, seed=seed), randn(batch, heads, length, dim,
                                                               seed=seed + 1)
    return kq.packed_keys(*compress(kq, k)), vq.packed_values(*compress(vq, v)[:2])


def oracle(query, keys, values, scale, is_causal, mask, kv_lens, exact):
    """float64 softmax attention over decompressed K/V with the exact positions overlaid
    (written out here: the slot of position j and which j are exact)."""
    k = reference.decompress(keys, torch.float64)
    v = reference.decompress(values.as_keys(), torch.float64)
    batch, heads, length, _ = k.shape
    ring = exact.keys.shape[2] - exact.sinks
    for b in range(batch):
        for j in range(int(kv_lens[b])):
            if j < exact.sinks or j >= int(exact.start[b]):
                slot = j if j < exact.sinks else exact.sinks + (j - exact.sinks) % ring
                k[b, :, j] = exact.keys[b, :, slot].double()
                v[b, :, j] = exact.values[b, :, slot].double()
    group = query.shape[1] // heads
    logits = (query.double() @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    keep = masks.visible(batch, query.shape[2], length, is_causal, kv_lens, query.device)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        logits = logits + mask.double()
    probs = torch.softmax(logits.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0)
    return probs @ v.repeat_interleave(group, 1)


def case(seed, *, batch=2, heads=2, group=2, q_len=1, length=40, dim=16, sinks=3, ring=8,
         lengths=(37, 6), behind=(8, 4), kind="mse", k_bits=4, v_bits=3, dtype=torch.float32):
    """Packed K/V, a query, and exact tokens whose window starts `behind` positions before
    each row's length (at most `ring`)."""
    keys, values = packed_pair(kind, k_bits, v_bits, batch, heads, length, dim, seed)
    slots = sinks + ring
    exact = ExactTokens(randn(batch, heads, slots, dim, seed=seed + 2, dtype=dtype) * 3,
                        randn(batch, heads, slots, dim, seed=seed + 3, dtype=dtype) * 3,
                        torch.tensor(lengths) - torch.tensor(behind), sinks)
    query = randn(batch, heads * group, q_len, dim, seed=seed + 4)
    return query, keys, values, torch.tensor(lengths), exact


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("is_causal,q_len,mask", [(False, 1, None), (True, 3, None),
                                                  (False, 2, "bool"), (True, 1, "float")])
def test_reference_reads_exact_positions_as_the_float64_oracle(is_causal, q_len, mask):
    query, keys, values, lens, exact = case(0, q_len=q_len)
    masks_by_kind = {"bool": randn(2, 1, q_len, 40, seed=9) > -1,
                     "float": randn(2, 4, q_len, 40, seed=9)}
    attn_mask = masks_by_kind.get(mask)
    args = (query, keys, values, 0.3, is_causal, attn_mask, lens)
    truth = oracle(*args, exact)
    assert rel_err(reference.attention(*args, exact), truth) < 1e-5
    without = oracle(*args, exact._replace(start=lens, sinks=0))
    assert rel_err(without, truth) > 0.05  # the exact tokens change the output


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/gpu covers the kernel")
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), group=st.sampled_from([1, 2, 4]), q_len=st.integers(1, 4),
       is_causal=st.booleans(), sinks=st.integers(0, 5), ring=st.integers(0, 20),
       length=st.integers(1, 90), kind=st.sampled_from(["mse", "prod"]),
       v_bits=st.sampled_from([2, 3, 4]), dim=st.sampled_from([16, 32, 48]),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_fused_kernel_reads_exact_positions_as_the_oracle(seed, group, q_len, is_causal, sinks,
                                                          ring, length, kind, v_bits, dim,
                                                          dtype):
    """Decode (and 2-4 query tokens) by the fused kernel under the interpreter, any sink count
    and ring (either 0), row lengths from 0 to the capacity, window starts anywhere the ring
    covers, fp32 or fp16 queries and exact tokens; several key splits (BLOCK_N 16)."""
    gen = torch.Generator().manual_seed(seed)
    if sinks + ring == 0:
        sinks = 1
    lengths = torch.randint(0, length + 1, (2,), generator=gen)
    behind = torch.randint(0, ring + 1, (2,), generator=gen).minimum(lengths)
    query, keys, values, lens, exact = case(
        seed, group=group, q_len=q_len, length=length, dim=dim, sinks=sinks, ring=ring,
        lengths=lengths.tolist(), behind=behind.tolist(), kind=kind, v_bits=v_bits, dtype=dtype)
    args = (query.to(dtype), keys, values, dim ** -0.5, is_causal, None, lens)
    out = attention_kernels.fused_attention(*args, exact, tune=dict(BLOCK_N=16, resident=1000))
    truth = oracle(*args, exact)
    assert out.dtype == dtype
    err = (out.double() - truth).norm() / truth.norm().clamp_min(1e-12)
    assert err < (3e-3 if dtype == torch.float32 else 4e-3) or truth.norm() < 1e-9, err


def test_op_checks_and_routes_exact_tokens():
    """opcheck with exact tokens; a missing tensor, a missing kv_lens, a window start the ring
    cannot hold, wrong shapes and dtypes are refused by name."""
    query, keys, values, lens, exact = case(1)
    args = ops.attention_args(query, keys, values, 0.3, False, None, lens, exact)
    torch.library.opcheck(torch.ops.tq.attention.default, args)
    truth = oracle(query, keys, values, 0.3, False, None, lens, exact)
    assert rel_err(torch.ops.tq.attention(*args), truth) < 1e-5
    flat = list(args)
    with pytest.raises(ValueError, match="go together"):
        torch.ops.tq.attention(*flat[:-3], None, *flat[-2:])
    with pytest.raises(ValueError, match="need kv_lens"):
        torch.ops.tq.attention(*flat[:17], None, *flat[18:])
    with pytest.raises(ValueError, match="exact_start must be at least kv_lens - 8"):
        torch.ops.tq.attention(*flat[:-2], exact.start - 1, flat[-1])
    with pytest.raises(ValueError, match="exact_values must have shape"):
        torch.ops.tq.attention(*flat[:-3], exact.values[:, :, 1:], *flat[-2:])
    with pytest.raises(TypeError, match="exact_values must have dtype"):
        torch.ops.tq.attention(*flat[:-3], exact.values.half(), *flat[-2:])
    with pytest.raises(ValueError, match="exact_sinks"):
        torch.ops.tq.attention(*flat[:-1], 12)


def test_read_cache_overlays_the_exact_tokens():
    """tq::read_cache with exact tokens: opcheck; each exact position holds its exact vector
    bit for bit, the others the decompressed one."""
    query, keys, values, lens, exact = case(2, batch=1, lengths=(30,), behind=(8,))
    args = (*keys, *values, torch.tensor(30), torch.float32, exact.keys, exact.values,
            torch.tensor(22), 3)
    torch.library.opcheck(torch.ops.tq.read_cache.default, args)
    k_hat, v_hat = torch.ops.tq.read_cache(*args)
    with pytest.raises(ValueError, match="exact_start must have 0 dimensions"):
        torch.ops.tq.read_cache(*args[:-2], torch.tensor([22]), 3)
    plain_k = torch.ops.tq.decompress(*keys, torch.float32)
    for j in range(40):
        slot = j if j < 3 else 3 + (j - 3) % 8
        exact_j = j < 3 or 22 <= j < 30
        assert torch.equal(k_hat[:, :, j], exact.keys[:, :, slot] if exact_j else plain_k[:, :, j])
        if exact_j:
            assert torch.equal(v_hat[:, :, j], exact.values[:, :, slot])


# ----------------------------------------------------------------------------- the cache

def states(batch, length, seed, dtype=torch.float16):
    return randn(batch, 2, length, 16, seed=seed, dtype=dtype), randn(batch, 2, length, 16,
                                                                      seed=seed + 1, dtype=dtype)


def exact_positions(layer) -> list[int]:
    """Positions the layer's reads take exact: j < sinks or j >= max(written - W, exact_from)."""
    written = int(layer.cumulative_length)
    start = max(written - layer.window, int(layer.exact_from))
    return [j for j in range(written) if j < layer.sinks or j >= start]


def test_cache_keeps_sink_and_window_tokens_bit_exact():
    """Updates of 1, 5 (longer than the window) and 2 tokens: read_cache returns the exact
    fp16 states at every sink and window position (bit for bit), the decompressed ones
    elsewhere; crop keeps what the ring still holds; reset forgets it."""
    config = transformers.LlamaConfig(**SMALL)
    cache = TurboQuantCache(config=config, max_cache_len=16, sinks=2, window=3,
                            center_keys=False)
    written = []
    for step, length in enumerate((1, 5, 2)):
        k, v = states(1, length, seed=step)
        written.append((k, v))
        k_out, v_out = cache.layers[0].update(k, v)
        all_k = torch.cat([w[0] for w in written], 2)
        all_v = torch.cat([w[1] for w in written], 2)
        layer = cache.layers[0]
        exact = exact_positions(layer)
        assert exact == sorted(set(range(min(2, all_k.shape[2])))
                               | set(range(max(0, all_k.shape[2] - 3), all_k.shape[2])))
        for j in range(all_k.shape[2]):
            same = torch.equal(k_out[:, :, j], all_k[:, :, j]) and torch.equal(
                v_out[:, :, j], all_v[:, :, j])
            assert same == (j in exact), (step, j)
    layer.crop(-2)  # 8 -> 6 tokens: the ring held 5, 6, 7; 5 stays exact
    assert exact_positions(layer) == [0, 1, 5]
    k_out, _ = torch.ops.tq.read_cache(*layer.packed_keys, *layer.packed_values,
                                       layer.cumulative_length, torch.float16,
                                       *layer.exact_tokens)
    assert torch.equal(k_out[:, :, 5], all_k[:, :, 5])
    assert not torch.equal(k_out[:, :, 4], all_k[:, :, 4])
    layer.reset()
    assert int(layer.exact_from) == 0 and layer.k_exact.abs().max() == 0


def test_cache_window_bytes_and_argument_errors():
    """Sink and window tokens cost (S + W) * D * 2 values per layer, batch row and kv head in
    the states' dtype; bad arguments and a states dtype other than the buffers' are refused."""
    config = transformers.LlamaConfig(**SMALL)
    plain = TurboQuantCache(config=config, max_cache_len=64, max_batch_size=2,
                            center_keys=False)
    windowed = TurboQuantCache(config=config, max_cache_len=64, max_batch_size=2,
                               center_keys=False, sinks=4, window=12, dtype=torch.bfloat16)
    assert windowed.nbytes() - plain.nbytes() == 2 * 2 * 2 * 16 * 16 * 2 * 2
    assert windowed.layers[0].k_exact.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="keeps its sink and window tokens in torch.bfloat16"):
        windowed.update(*states(2, 3, 0, dtype=torch.float16), 0)
    for bad in (dict(sinks=-1), dict(window=1.5)):
        with pytest.raises(ValueError, match="must be an int"):
            TurboQuantCache(config=config, max_cache_len=8, **bad)
    with pytest.raises(TypeError, match="dtype must be"):
        TurboQuantCache(config=config, max_cache_len=8, window=2, dtype=torch.int8)


@pytest.mark.parametrize("center_keys", [False, True])
def test_windowed_decode_eager_equals_compiled_and_the_eval_simulation(center_keys):
    """A 4-token prompt, then 14 decode steps with sinks 2 and window 4: greedy tokens are the
    same eagerly and compiled (decode sites rewritten onto tq::attention with the exact
    tokens); each step's logits equal those of the eval tool's simulation (each query reads its
    window and sinks exact) over the whole sequence, within float32 rounding; without the
    window they differ. With centred keys (the cache's prefill mean, not the simulation's
    sequence mean) only eager = compiled is checked."""
    from tq_ops.compile import backend
    from tq_ops.evaluate import Scheme, _AttentionSwap, tq_attention

    model = tiny_llama()
    prompt = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(1))

    def cache(**levers):
        return TurboQuantCache(config=model.config, max_cache_len=18, per_layer_seeds=True,
                               center_keys=center_keys, **levers)

    def run(levers, steps=14):
        out = model.generate(prompt, cache=cache(**levers), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits, 1)

    eager, eager_logits = run(dict(sinks=2, window=4))
    compiler = backend(mode="cache")
    model.forward = torch.compile(model.forward, backend=compiler, fullgraph=True)
    compiled, _ = run(dict(sinks=2, window=4))
    del model.forward
    assert torch.equal(eager, compiled)
    assert [s.source for s in compiler.sites] == ["cache", "cache"]  # decode, 2 layers
    if center_keys:
        return
    swap = _AttentionSwap(model, "tq_window_test", tq_attention(
        Scheme("tq", 4, 3, center_keys=False, window=4, sinks=2), layers=2))
    with torch.no_grad():
        simulated = swap(eager[:, :-1])[:, 3:]
    torch.testing.assert_close(eager_logits, simulated, rtol=1e-4, atol=1e-4)
    _, plain_logits = run({})
    assert (plain_logits - simulated).abs().max() > 1e-2
