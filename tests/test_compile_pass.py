"""The FX attention pass on small Dynamo graphs, run eagerly after the rewrite (no Inductor).

Oracle: the plain-torch reference (`tq_ops.reference`) applied to the same K/V with the
quantizer constants of the site (`site_quantizers`), i.e. an independent eager simulation.
"""

import logging
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from tq_ops import reference
from tq_ops.quantizer import key_channel_scale
from tq_ops.compile import (
    TurboQuantConfig,
    TurboQuantPass,
    backend,
    rewrite_attention,
    site_quantizers,
)

B, HQ, HKV, L, D = 2, 4, 2, 6, 16


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def channel_scale(k):
    """key_channel_scale in float64: per-channel RMS over the sequence, floored at 1/32 of the
    largest channel's, ones where all channels are 0."""
    rms = k.double().pow(2).mean(-2, keepdim=True).sqrt()
    top = rms.max(-1, keepdim=True).values
    return torch.where(top > 0, rms.clamp(min=0).maximum(top / 32), torch.ones_like(rms))


def simulate(config, index, q, k, v, scale, is_causal=False, mask=None):
    """Eager TurboQuant attention of one site with the reference ops (K/V heads may be fewer);
    keys minus their mean over the sequence when config.center_keys; with config.scale_keys
    keys divided by `channel_scale` and queries multiplied by it."""
    kq, vq = site_quantizers(config, index, k.shape[-1], v.shape[-1])
    k = k - k.mean(-2, keepdim=True) if config.center_keys else k
    if config.scale_keys:
        s = channel_scale(k).to(k.dtype)
        k, q = k / s, q * s.repeat_interleave(q.shape[1] // k.shape[1], 1)
    kc = reference.compress(k, kq.rotation, kq.centroids, kq.qjl, kq.index_bits, torch.float16)
    vc = reference.compress(v, vq.rotation, vq.centroids, None, vq.index_bits, torch.float16)
    return reference.attention(q, kq.packed_keys(*kc), vq.packed_values(*vc[:2]), scale,
                               is_causal, mask, None)


def rewrite_and_run(fn, *args, config=None):
    """Compile `fn` with a backend that rewrites the Dynamo graph and runs it eagerly."""
    config = config or TurboQuantConfig()
    found = []

    def eager_rewrite(gm, example_inputs):
        found.extend(rewrite_attention(gm, config))
        found.append(gm)
        return gm.forward

    out = torch.compile(fn, backend=eager_rewrite, fullgraph=True)(*args)
    return out, found[:-1], found[-1]


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def qkv(kv_heads=HKV, q_len=L, kv_len=L):
    return randn(B, HQ, q_len, D), randn(B, kv_heads, kv_len, D, seed=1), \
        randn(B, kv_heads, kv_len, D, seed=2)


SDPA_FORMS = {
    "plain": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v), HQ, None, False, None),
    "causal": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               HQ, None, True, None),
    "bool_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m > 0),
                  HQ, "bool", False, None),
    "float_mask_scale": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, 0.0,
                                                                           False, scale=0.3),
                         HQ, "float", False, 0.3),
    "enable_gqa": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                   HKV, None, False, None),
    "repeat_kv": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=m), HKV, "float", False, None),
    "repeat_interleave": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True),
        HKV, None, True, None),
}


@pytest.mark.parametrize("form", SDPA_FORMS)
@pytest.mark.parametrize("key_quantizer", ["mse", "prod"])
def test_sdpa_forms_match_eager_simulation(form, key_quantizer):
    fn, kv_heads, mask_kind, causal, scale = SDPA_FORMS[form]
    q, k, v = qkv(kv_heads)
    mask = randn(B, 1, L, L, seed=3)
    config = TurboQuantConfig(k_bits=4, v_bits=3, key_quantizer=key_quantizer)
    out, sites, gm = rewrite_and_run(lambda q, k, v, m: fn(q, k, v, m) * 2, q, k, v, mask,
                                     config=config)
    assert len(sites) == 1 and sites[0].key_shape == (B, kv_heads, L, D)
    assert sites[0].kind == ("sdpa+repeat_kv" if form.startswith("repeat") else "sdpa")
    assert not any(n.target in (F.scaled_dot_product_attention,
                                torch._C._nn.scaled_dot_product_attention)
                   for n in gm.graph.nodes)
    used_mask = {"bool": mask > 0, "float": mask, None: None}[mask_kind]
    expected = simulate(config, 0, q, k, v, scale or 1 / math.sqrt(D), causal, used_mask) * 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    exact = fn(q, k, v, mask) * 2
    error = ((out - exact).norm() / exact.norm()).item()
    assert 0.01 < error < 0.5, error  # compressed: close to, but not equal to, exact attention


def exact_attention(q, k, v, scale, is_causal, mask):
    """float64 attention with GQA, bottom-right causal masking and a bool mask (True =
    visible); a row that sees no key gives 0, as tq::attention does."""
    k, v = (t.double().repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    logits = q.double() @ k.mT * scale
    visible = torch.ones(logits.shape[-2:], dtype=torch.bool)
    if is_causal:
        visible = visible.tril(logits.shape[-1] - logits.shape[-2])
    if mask is not None:
        visible = visible & mask
    p = torch.softmax(logits.masked_fill(~visible, -math.inf), -1).nan_to_num(0.0)
    return p @ v


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 7), st.sampled_from([1, 2]), st.booleans(),
       st.floats(0.0, 30.0), st.integers(0, 2 ** 16))
def test_centring_keys_leaves_exact_attention_unchanged(q_len, kv_len, group, causal, offset,
                                                        seed):
    """What center_keys relies on: subtracting each (batch, kv head)'s key mean over the
    sequence adds q.mean to every logit of a row, which softmax ignores; rows with no visible
    key (random masks, a causal mask over fewer keys than queries) stay 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2 * group, q_len, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, kv_len, 8, dtype=torch.float64, generator=g) for _ in range(2))
    k = k + offset * torch.randn(2, 2, 1, 8, dtype=torch.float64, generator=g)
    mask = torch.rand(2, 1, q_len, kv_len, generator=g) < 0.6
    centred = k - k.mean(-2, keepdim=True)
    torch.testing.assert_close(exact_attention(q, centred, v, 0.35, causal, mask),
                               exact_attention(q, k, v, 0.35, causal, mask), rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("form", ["causal", "bool_mask", "enable_gqa", "repeat_kv"])
def test_center_keys_compresses_keys_minus_their_mean(form):
    """With center_keys the site compresses k - mean_S(k) per (batch, kv head) (the oracle
    `simulate` centres); on keys with a large common offset that cuts the attention error
    against exact attention."""
    fn, kv_heads, mask_kind, causal, scale = SDPA_FORMS[form]
    q, k, v = qkv(kv_heads)
    k = k + 4 * randn(B, kv_heads, 1, D, seed=4)
    mask = randn(B, 1, L, L, seed=3)
    used_mask = {"bool": mask > 0, "float": mask, None: None}[mask_kind]
    exact = fn(q, k, v, mask)
    errors = []
    for center in (True, False):
        config = TurboQuantConfig(k_bits=3, v_bits=4, center_keys=center)
        out, sites, _ = rewrite_and_run(fn, q, k, v, mask, config=config)
        expected = simulate(config, 0, q, k, v, scale or 1 / math.sqrt(D), causal, used_mask)
        assert len(sites) == 1
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        errors.append(((out - exact).norm() / exact.norm()).item())
    assert errors[0] < errors[1] / 2, errors


@pytest.mark.parametrize("form", ["causal", "float_mask_scale", "enable_gqa", "repeat_kv"])
@pytest.mark.parametrize("center", [False, True])
def test_scale_keys_compresses_scaled_keys_and_scales_the_query(form, center):
    """With scale_keys the site compresses k / s and attends with q * s (s per batch, KV head
    and channel, repeated over the GQA group), as the oracle does; the keys' channel spreads
    differ 100-fold, and without the quantizer the rescaling is exact."""
    fn, kv_heads, mask_kind, causal, scale = SDPA_FORMS[form]
    q, k, v = qkv(kv_heads)
    k = k * torch.logspace(-1, 1, D) + 3 * randn(B, kv_heads, 1, D, seed=4)
    mask = randn(B, 1, L, L, seed=3)
    used_mask = {"bool": mask > 0, "float": mask, None: None}[mask_kind]
    config = TurboQuantConfig(k_bits=3, v_bits=4, center_keys=center, scale_keys=True)
    out, sites, _ = rewrite_and_run(fn, q, k, v, mask, config=config)
    expected = simulate(config, 0, q, k, v, scale or 1 / math.sqrt(D), causal, used_mask)
    assert len(sites) == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    s = channel_scale(k - k.mean(-2, keepdim=True) if center else k)
    group = q.shape[1] // kv_heads
    qd, kd, vd = q.double(), k.double(), v.double()
    torch.testing.assert_close(fn(qd * s.repeat_interleave(group, 1), kd / s, vd, mask.double()),
                               fn(qd, kd, vd, mask.double()), rtol=1e-10, atol=1e-10)


def test_key_channel_scale_against_float64():
    """RMS per channel over the sequence, floored at 1/32 of the largest, ones for zero keys."""
    k = randn(2, 3, 9, 16) * torch.logspace(-3, 1, 16)
    k[1, 2] = 0
    got = key_channel_scale(k)
    assert got.shape == (2, 3, 1, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), channel_scale(k), rtol=1e-6, atol=0)
    assert (got[1, 2] == 1).all() and (got[0, 0, 0, :4] == got[0, 0, 0].max() / 32).all()


def gpt2_style(q, k, v, mask):
    w = torch.matmul(q, k.transpose(-1, -2))
    w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype)
    w = w + mask
    w = F.softmax(w, dim=-1).type(v.dtype)
    return torch.matmul(F.dropout(w, p=0.1, training=False), v)


def llama_eager_style(q, k, v, mask):
    k, v = repeat_kv(k, 2), repeat_kv(v, 2)
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25
    w = w + mask[:, :, :, : k.shape[-2]]
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(w, p=0.0, training=True), v)


@pytest.mark.parametrize("fn,kv_heads,kind", [(gpt2_style, HQ, "matmul"),
                                              (llama_eager_style, HKV, "matmul+repeat_kv")])
def test_explicit_matmul_softmax_attention(fn, kv_heads, kind):
    q, k, v = qkv(kv_heads)
    mask = torch.zeros(B, 1, L, L).masked_fill(torch.ones(L, L).triu(1).bool(), -1e9)
    out, sites, _ = rewrite_and_run(fn, q, k, v, mask)
    assert [s.kind for s in sites] == [kind]
    torch.testing.assert_close(out, simulate(TurboQuantConfig(), 0, q, k, v, 0.25, mask=mask),
                               rtol=1e-5, atol=1e-5)


def nanogpt_style(q, k, v, bias):
    att = (q @ k.transpose(-2, -1)) * 0.25
    att = att.masked_fill(bias[:, :, :L, :L] == 0, float("-inf"))
    return F.softmax(att, dim=-1) @ v


def where_styles(q, k, v, bias):
    keep = bias[:, :, :L, :L] > 0
    a = torch.where(keep, q @ k.transpose(-2, -1) * 0.25, float("-inf"))
    b = torch.where(~keep, float("-inf"), q @ k.transpose(-2, -1) * 0.25)
    return F.softmax(a, dim=-1) @ v + 2 * (F.softmax(b, dim=-1) @ v)


def test_masked_fill_and_where_with_minus_inf_are_rewritten():
    q, k, v = qkv(HQ)
    bias = torch.ones(L + 3, L + 3).tril().view(1, 1, L + 3, L + 3)
    keep = bias[:, :, :L, :L] > 0
    config = TurboQuantConfig()
    out, sites, gm = rewrite_and_run(nanogpt_style, q, k, v, bias)
    assert [s.kind for s in sites] == ["matmul"]
    assert not any(n.target in ("masked_fill", torch.matmul, operator.matmul)
                   for n in gm.graph.nodes), gm.graph  # the dense path is gone
    torch.testing.assert_close(out, simulate(config, 0, q, k, v, 0.25, mask=keep),
                               rtol=1e-5, atol=1e-5)
    out, sites, _ = rewrite_and_run(where_styles, q, k, v, bias)
    assert [s.kind for s in sites] == ["matmul", "matmul"]
    expected = (simulate(config, 0, q, k, v, 0.25, mask=keep)
                + 2 * simulate(config, 1, q, k, v, 0.25, mask=keep))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def keyword_spellings(q, k, v, mask):
    """Every step of both attention forms with its tensors passed by keyword."""
    w = torch.mul(input=q @ torch.transpose(input=k, dim0=-1, dim1=-2), other=0.25)
    w = F.softmax(input=torch.add(input=w, other=mask), dim=-1)
    x = torch.matmul(input=F.dropout(input=w, p=0.0), other=v)
    k2, v2 = (torch.repeat_interleave(input=t[:, :HKV], repeats=2, dim=1) for t in (k, v))
    x = x + F.scaled_dot_product_attention(query=q, key=k2, value=v2, attn_mask=mask)
    return x + F.softmax(q @ k.mT * 0.25 + mask, dim=-1) @ v  # the property spelling


def test_keyword_argument_spellings_are_rewritten():
    q, k, v = qkv(HQ)
    mask = randn(B, 1, L, L, seed=3)
    out, sites, _ = rewrite_and_run(keyword_spellings, q, k, v, mask)
    assert [s.kind for s in sites] == ["matmul", "sdpa+repeat_kv", "matmul"]
    config = TurboQuantConfig()
    expected = (simulate(config, 0, q, k, v, 0.25, mask=mask)
                + simulate(config, 1, q, k[:, :HKV], v[:, :HKV], 0.25, mask=mask)
                + simulate(config, 2, q, k, v, 0.25, mask=mask))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def escaping_weights(q, k, v, mask):
    w = F.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
    return w @ v, w


def mask_written_mid_attention(q, k, v):
    mask = torch.zeros(q.shape[2], k.shape[2])
    w = F.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1)
    mask[:, 0] = -math.inf  # after the logits: the original attention never sees it
    return w @ v


def one_head_repeated(t):
    return t[:, :1].repeat_interleave(HQ, dim=1)


UNPROVABLE = {
    "dropout": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5), L,
                "dropout_p"),
    "causal_q_ne_k": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                      3, "top-left"),
    "weights_escape": (lambda q, k, v: escaping_weights(q, k, v, None), L, "used elsewhere"),
    "softmax_other_dim": (lambda q, k, v: F.softmax(q @ k.transpose(-1, -2), dim=2) @ v, L,
                          "dim 2"),
    "bool_added": (lambda q, k, v: F.softmax(q @ k.transpose(-1, -2) + (k[:, :, :, 0] > 0)[
        :, :, None], dim=-1) @ v, L, "floating mask"),
    "sdpa_batch_broadcast": (lambda q, k, v: F.scaled_dot_product_attention(q[:1], k, v), L,
                             "batch sizes"),
    "matmul_batch_broadcast": (lambda q, k, v: F.softmax(q @ k[:1].transpose(-1, -2), dim=-1)
                               @ v[:1], L, "batch sizes"),
    "sdpa_head_broadcast": (lambda q, k, v: F.scaled_dot_product_attention(
        q[:, :1], one_head_repeated(k), one_head_repeated(v)), L, "head counts differ"),
    "head_dim_4": (lambda q, k, v: F.scaled_dot_product_attention(q[..., :4], k[..., :4],
                                                                  v[..., :4]), L, "outside"),
    "mask_written_mid_attention": (mask_written_mid_attention, L, "in-place"),
    "active_dropout": (lambda q, k, v: F.dropout(F.softmax(q @ k.transpose(-1, -2), dim=-1),
                                                 0.5, training=True) @ v, L, "inactive dropout"),
    "finite_fill": (lambda q, k, v: F.softmax((q @ k.transpose(-1, -2)).masked_fill(
        k[:, :, None, :, 0] > 0, -1e9), dim=-1) @ v, L, "not -inf"),
    "head_mask": (lambda q, k, v: (F.softmax(q @ k.transpose(-1, -2), dim=-1) * q[:, :, :1, :1])
                  @ v, L, "neither a cast"),
}
RANDOM = ("dropout", "active_dropout")


@pytest.mark.parametrize("case", [*UNPROVABLE, "requires_grad"])
def test_unprovable_sites_are_left_alone_and_logged(case, caplog):
    fn, q_len, reason = UNPROVABLE.get(case) or (F.scaled_dot_product_attention, L, "grad")
    q, k, v = qkv(HQ, q_len=q_len)
    q.requires_grad_(case == "requires_grad")
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="tq_ops"):
        out, sites, _ = rewrite_and_run(fn, q, k, v)
    assert sites == []
    assert any(reason in r.getMessage() for r in caplog.records), caplog.text
    if case not in RANDOM:
        torch.testing.assert_close(out, fn(q, k, v), rtol=0, atol=0)


def test_dynamic_head_dim_is_left_alone(caplog):
    def attend(q, k, v):
        return F.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v

    q, k, v = qkv(HQ)
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 3)
    with caplog.at_level(logging.WARNING, logger="tq_ops"):
        out, sites, _ = rewrite_and_run(attend, q, k, v)
    assert sites == [] and "head_dim is not static" in caplog.text
    torch.testing.assert_close(out, attend(q, k, v), rtol=0, atol=0)


def test_graph_without_attention_is_unchanged():
    def mlp(x, w):
        return F.softmax(torch.relu(x @ w) @ w.T, dim=-1)

    x, w = randn(3, 8), randn(8, 8, seed=1)
    out, sites, _ = rewrite_and_run(mlp, x, w)
    assert sites == [] and torch.equal(out, mlp(x, w))


def cache_step(x, k_new, v_new, q, buffers, consts, counter):
    """A hand-written TurboQuantCache-like step: append, bump the counter, decompress, attend."""
    k_idx, k_norms, v_idx, v_norms = buffers
    k_rot, k_cent, v_rot, v_cent = consts
    pos = torch.arange(k_new.shape[2]) + counter
    counter.add_(k_new.shape[2])
    torch.ops.tq.compress_into(k_new, k_rot, k_cent, None, 3, pos, k_idx, k_norms, None, None)
    torch.ops.tq.compress_into(v_new, v_rot, v_cent, None, 2, pos, v_idx, v_norms, None, None)
    k = torch.ops.tq.decompress(k_idx, k_norms, None, None, k_rot, k_cent, None, 3, q.dtype)
    v = torch.ops.tq.decompress(v_idx, v_norms, None, None, v_rot, v_cent, None, 2, q.dtype)
    keep = torch.arange(k.shape[2]) < counter
    return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2),
                                          attn_mask=keep[None, None, None, :]) + x


def test_cache_reads_fuse_into_compressed_attention():
    kq, vq = site_quantizers(TurboQuantConfig(k_bits=3, v_bits=2), 0, D, D)
    capacity = 10
    buffers = [torch.zeros(1, HKV, capacity, n, dtype=dt) for n, dt in
               ((6, torch.uint8), (1, torch.float16), (4, torch.uint8), (1, torch.float16))]
    consts = (kq.rotation, kq.centroids, vq.rotation, vq.centroids)
    counter = torch.zeros((), dtype=torch.long)
    prefill = randn(1, HKV, 4, D), randn(1, HKV, 4, D, seed=1)
    cache_step(torch.zeros(()), *prefill, randn(1, HQ, 4, D), buffers, consts, counter)
    expected_buffers = [b.clone() for b in buffers]
    expected_counter = counter.clone()
    k_new, v_new = randn(1, HKV, 1, D, seed=2), randn(1, HKV, 1, D, seed=3)
    q, x = randn(1, HQ, 1, D, seed=4), randn(1, HQ, 1, D, seed=5)
    expected = cache_step(x, k_new, v_new, q, expected_buffers, consts, expected_counter)
    out, sites, gm = rewrite_and_run(cache_step, x, k_new, v_new, q, buffers, consts, counter,
                                     config=TurboQuantConfig(mode="cache"))
    assert [(s.source, s.kind, s.k_bits, s.v_bits) for s in sites] == \
        [("cache", "sdpa+repeat_kv", 3, 2)]
    targets = [str(n.target) for n in gm.graph.nodes]
    assert not any("decompress" in t for t in targets)  # never materialised
    assert sum("compress_into" in t for t in targets) == 2
    assert "add_" in targets  # the in-place counter survives (no DCE)
    assert int(counter) == 5
    for got, want in zip(buffers, expected_buffers):
        assert torch.equal(got, want)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_cache_mode_leaves_plain_attention(caplog):
    q, k, v = qkv(HQ)
    with caplog.at_level(logging.INFO, logger="tq_ops"):
        out, sites, _ = rewrite_and_run(F.scaled_dot_product_attention, q, k, v,
                                        config=TurboQuantConfig(mode="cache"))
    assert sites == [] and "TurboQuantCache" in caplog.text
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_config_validation_and_pass_uuid():
    with pytest.raises(ValueError, match="key_quantizer"):
        TurboQuantConfig(key_quantizer="qjl")
    with pytest.raises(ValueError, match="mode"):
        TurboQuantConfig(mode="fast")
    with pytest.raises(ValueError, match="v_bits"):
        TurboQuantConfig(v_bits=9)
    a, b = TurboQuantPass(), TurboQuantPass(TurboQuantConfig(k_bits=3))
    assert a.uuid() == TurboQuantPass().uuid() and a.uuid() != b.uuid()
    assert backend(k_bits=3, v_bits=2, key_quantizer="prod").config == TurboQuantConfig(
        3, 2, "prod")
    assert backend(key_quantizer="prod", qjl_dim=24, seed=2 ** 63 - 1,
                   norm_dtype=torch.bfloat16).config.qjl_dim == 24
    assert backend(center_keys=False).config == TurboQuantConfig(center_keys=False)
    assert TurboQuantConfig().center_keys and TurboQuantConfig(mode="cache").center_keys


BAD_SETTINGS = [
    ({"norm_dtype": torch.float64}, TypeError, "norm_dtype must be"),
    ({"norm_dtype": "float16"}, TypeError, "norm_dtype must be"),
    ({"key_quantizer": "prod", "qjl_dim": 0}, ValueError, "qjl_dim must be a positive int"),
    ({"key_quantizer": "prod", "qjl_dim": 16.0}, ValueError, "qjl_dim must be a positive int"),
    ({"key_quantizer": "prod", "qjl_dim": True}, ValueError, "qjl_dim must be a positive int"),
    ({"qjl_dim": 16}, ValueError, "qjl_dim applies to key_quantizer='prod'"),
    ({"seed": True}, TypeError, "seed must be an int"),
    ({"seed": 1.0}, TypeError, "seed must be an int"),
    ({"seed": 2 ** 64 - 1}, ValueError, r"seed must be in \[-2\*\*63, 2\*\*63\)"),
    ({"seed": -2 ** 63 - 1}, ValueError, r"seed must be in"),
    ({"mode": "cache", "k_bits": 3}, ValueError, "k_bits would be ignored"),
    ({"mode": "cache", "v_bits": 2, "seed": 1}, ValueError, "v_bits, seed would be ignored"),
    ({"mode": "cache", "key_quantizer": "prod"}, ValueError, "key_quantizer would be ignored"),
    ({"mode": "cache", "norm_dtype": torch.float32}, ValueError, "norm_dtype would be ignored"),
    ({"center_keys": 1}, TypeError, "center_keys must be a bool"),
    ({"scale_keys": None}, TypeError, "scale_keys must be a bool"),
    ({"mode": "cache", "center_keys": False}, ValueError, "center_keys would be ignored"),
]


@pytest.mark.parametrize("settings,error,message", BAD_SETTINGS)
def test_backend_refuses_bad_settings_when_built(settings, error, message):
    with pytest.raises(error, match=message):
        backend(**settings)
    with pytest.raises(error, match=message):
        TurboQuantConfig(**settings)


def test_largest_seed_builds_quantizers_for_many_sites():
    config = TurboQuantConfig(key_quantizer="prod", seed=2 ** 63 - 1)
    keys, values = site_quantizers(config, 1000, D, D)  # seeds 2**63 + 1999 and + 2000
    assert keys.qjl.shape == (D, D) and values.rotation.shape == (D, D)


def einsum_attention(q, k, v):
    w = F.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.25, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", w, v)


def bmm_attention(q, k, v):
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))
    w = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1)
    return torch.bmm(w, v) + w.float().bmm(v)


@pytest.mark.parametrize("fn", [einsum_attention, bmm_attention])
def test_einsum_and_bmm_attention_are_left_alone_and_logged(fn, caplog):
    q, k, v = qkv(HQ)
    with caplog.at_level(logging.WARNING, logger="tq_ops"):
        out, sites, _ = rewrite_and_run(fn, q, k, v)
    assert sites == []
    lines = [r.getMessage() for r in caplog.records]
    assert sum("einsum/bmm attention is not matched" in m for m in lines) == (
        2 if fn is bmm_attention else 1), lines
    exact = F.scaled_dot_product_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(out, exact if fn is einsum_attention else 2 * exact.flatten(0, 1))


def test_backend_is_registered():
    import tq_ops.compile  # noqa: F401

    assert "turboquant" in torch._dynamo.list_backends(exclude_tags=())
