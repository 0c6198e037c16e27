"""`tq-ops eval` (tq_ops/evaluate.py): one run of the tool on the small random Llama, checked
through its table and --json file, and its pieces against float64 references."""

import contextlib
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch

from tq_ops import evaluate as ev
from tq_ops.quantizer import make_quantizers

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(stdout, parsed --json) of `tq-ops eval` on 240 random tokens, K/V 4/4 and 2/2, with
    the lever "center"."""
    path = tmp_path_factory.mktemp("eval") / "out.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ev.main(["--tokens", "240", "--max-length", "120", "--stride", "60",
                        "--bits", "4/4,2/2", "--levers", "center", "--json", str(path),
                        "--no-progress"]) == 0
    return out.getvalue(), json.loads(path.read_text())


def rows_by_name(data):
    return {r["scheme"]: r for r in data["results"]}


def test_table_has_every_scheme_and_uncompressed_is_exact(run):
    text, data = run
    rows = rows_by_name(data)
    names = ["uncompressed", "tq K4/V4 mse", "tq K4/V4 mse +center", "per-token RTN K4/V4",
             "KIVI-style K4/V4", "tq K2/V2 mse", "tq K2/V2 mse +center", "per-token RTN K2/V2",
             "KIVI-style K2/V2"]
    assert list(rows) == names
    for name in names:
        assert f"| {name} |" in text
    base = rows["uncompressed"]
    assert base["kl_mean"] == 0 and base["kl_p90"] == 0 and base["delta_ppl_pct"] == 0
    assert base["top1_agreement"] == 1
    assert all(r["tokens"] == 239 for r in rows.values())  # every token but the first, once
    for r in rows.values():
        assert math.isclose(r["delta_ppl_pct"],
                            100 * (r["perplexity"] / base["perplexity"] - 1), rel_tol=1e-9)


def test_kl_grows_as_bits_fall(run):
    rows = rows_by_name(run[1])
    for method in ("tq", "per-token RTN", "KIVI-style"):
        suffix = " mse" if method == "tq" else ""
        high, low = rows[f"{method} K4/V4{suffix}"], rows[f"{method} K2/V2{suffix}"]
        assert 0 < high["kl_mean"] < low["kl_mean"], method
        assert high["kl_p90"] < low["kl_p90"] and high["top1_agreement"] > low["top1_agreement"]


def test_center_lever_keeps_the_bits_and_reports_the_mean_apart(run):
    rows = rows_by_name(run[1])
    for bits in ("K4/V4", "K2/V2"):
        plain, centred = rows[f"tq {bits} mse"], rows[f"tq {bits} mse +center"]
        assert centred["center_keys"] and not plain["center_keys"]
        for key in ("k_bits_per_element", "v_bits_per_element", "bytes_per_token"):
            assert centred[key] == plain[key]
        assert centred["sequence_bytes"] == 2 * 2 * 64 * 4 and plain["sequence_bytes"] == 0
        assert centred["kl_mean"] > 0 and centred["kl_mean"] != plain["kl_mean"]


def test_schemes_per_lever_and_without_baselines():
    got = [s.name for s in ev.default_schemes([(4, 3)], ("mse", "prod"), ("center",),
                                              baselines=False)]
    assert got == ["uncompressed", "tq K4/V3 mse", "tq K4/V3 mse +center", "tq K4/V3 prod",
                   "tq K4/V3 prod +center"]
    with pytest.raises(ValueError, match="levers"):
        ev.default_schemes([(4, 3)], levers=("window",))
    with pytest.raises(ValueError, match="center_keys"):
        ev.Scheme("kivi", 4, 4, center_keys=True)


def test_bits_and_bytes_follow_the_stored_fields(run):
    d, group, layers, kv_heads = 64, 32, 2, 2  # ev.random_llama
    expected = {"uncompressed": (16, 16), "tq K4/V4 mse": (4 + 16 / d, 4 + 16 / d),
                "per-token RTN K2/V2": (2 + 32 / d, 2 + 32 / d),
                "KIVI-style K4/V4": (4 + 32 / group, 4 + 32 / d)}
    rows = rows_by_name(run[1])
    for name, (k, v) in expected.items():
        r = rows[name]
        assert (r["k_bits_per_element"], r["v_bits_per_element"]) == pytest.approx((k, v))
        assert r["bytes_per_token"] == pytest.approx(layers * kv_heads * d * (k + v) / 8)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("k_bits,v_bits", [(4, 3), (2, 2), (3, 1)])
def test_bits_per_element_formulas(d, k_bits, v_bits):
    def bpe(method, kq="mse"):
        return ev.bits_per_element(ev.Scheme(method, k_bits, v_bits, kq), d, group=16)

    assert bpe("tq") == pytest.approx((k_bits + 16 / d, v_bits + 16 / d))
    assert bpe("tq", "prod") == pytest.approx((k_bits + 32 / d, v_bits + 16 / d))
    assert bpe("rtn") == pytest.approx((k_bits + 32 / d, v_bits + 32 / d))
    assert bpe("kivi") == pytest.approx((k_bits + 2, v_bits + 32 / d))


def reference_fake_quantize(rows, bits):
    """Round-to-nearest of each row of a (n, m) float64 list, fp16 scale and zero."""
    out = []
    for row in rows:
        zero = float(torch.tensor(min(row)).half())
        scale = float(torch.tensor((max(row) - min(row)) / (2 ** bits - 1)).half())
        codes = [min(max(round((x - zero) / scale), 0), 2 ** bits - 1) for x in row]
        out.append([c * scale + zero for c in codes])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("bits", [2, 4])
def test_per_token_quantizer_matches_float64(bits):
    x = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(bits)) * 3
    got = ev.fake_quantize(x, bits, dim=-1)
    want = reference_fake_quantize(x.double().reshape(-1, 16).tolist(), bits)
    torch.testing.assert_close(got.double().reshape(-1, 16), want, rtol=0, atol=1e-5)
    assert got.dtype == x.dtype and got.shape == x.shape


def test_kivi_keys_per_channel_groups_match_float64():
    group, bits = 4, 3
    k = torch.randn(1, 2, 11, 8, generator=torch.Generator().manual_seed(0))
    got = ev.kivi_keys(k, bits, group)
    for h in range(2):
        for start in (0, 4):  # full groups: tokens 0-3 and 4-7, quantized per channel
            block = k[0, h, start:start + group].double().T.tolist()  # (channel, token)
            want = reference_fake_quantize(block, bits).T
            torch.testing.assert_close(got[0, h, start:start + group].double(), want,
                                       rtol=0, atol=1e-5)
        assert torch.equal(got[0, h, 8:], k[0, h, 8:])  # the tail group stays exact


def test_kivi_attention_reads_exact_keys_of_the_open_group():
    """Query i attends, causally, to quantized K/V of groups full at step i and exact K/V of
    the rest; checked row by row in float64 against per-query key sets."""
    group, bits, length, dim = 4, 2, 10, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, length, dim, generator=g) for _ in range(3))
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True)
    out, _ = ev.kivi_attention((bits, bits), group)(module, q, k, v, None)
    kq, vq = ev.kivi_keys(k, bits, group).double(), ev.fake_quantize(v, bits, -1).double()
    for i in range(length):
        full = (i + 1) // group * group  # keys before this index are in full groups
        keys = torch.cat([kq[:, :, :full], k.double()[:, :, full:i + 1]], dim=2)
        values = torch.cat([vq[:, :, :full], v.double()[:, :, full:i + 1]], dim=2)
        p = torch.softmax(q.double()[:, :, i:i + 1] @ keys.mT / math.sqrt(dim), -1)
        torch.testing.assert_close(out[:, i].double(), (p @ values)[:, :, 0], rtol=0,
                                   atol=1e-5)


def test_exact_for_query_marks_sinks_and_the_recent_window():
    for q_len, k_len, window, sinks in ((5, 9, 3, 2), (1, 7, 1, 0), (4, 4, 0, 1), (3, 6, 9, 0)):
        got = ev.exact_for_query(q_len, k_len, window, sinks, "cpu")
        for i in range(q_len):
            position = k_len - q_len + i
            want = [j < sinks or position - window < j for j in range(k_len)]
            assert got[i].tolist() == want


def split_round_trip(x, low, high):
    """The "split" lever written out per (batch, head): the half of the channels with the
    largest RMS over the sequence through `high`, the others through `low`, each part in
    decreasing RMS order."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            rms = x[b, h].pow(2).mean(0)
            order = sorted(range(x.shape[-1]), key=lambda c: -float(rms[c]))
            top, rest = order[:len(order) // 2], order[len(order) // 2:]
            for channels, quant in ((top, high), (rest, low)):
                part = ev.round_trip(quant, x[b:b + 1, h:h + 1][..., channels])
                out[b, h][..., channels] = part[0, 0]
    return out


@pytest.mark.parametrize("center,scale,vcenter,split", [(False, False, False, False),
                                                        (True, True, True, False),
                                                        (True, False, False, True)])
def test_tq_attention_reads_compressed_keys_outside_window_and_sinks(center, scale, vcenter,
                                                                     split):
    """Query i attends causally to exact K/V of the sink tokens and of its window and to the
    round-tripped (centred, scaled) K/V of the rest (values round-tripped minus their mean,
    then plus it, with vcenter; halves of the channels at b + 1 and b bits with split);
    checked row by row in float64 against the quantizers of site 1, in layer 1 of 3 (the edge
    bit not applied) and layer 2 (applied)."""
    length, dim, window, sinks = 12, 16, 3, 2
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, length, dim, generator=g)
    k, v = (torch.randn(1, 2, length, dim, generator=g) for _ in range(2))
    for layer, extra in ((1, 0), (2, 1)):
        scheme = ev.Scheme("tq", 3, 2, center_keys=center, scale_keys=scale, window=window,
                           sinks=sinks, edge_bits=1 - split, center_values=vcenter,
                           split=split)
        module = SimpleNamespace(num_key_value_groups=2, is_causal=True, layer_idx=layer)
        out, _ = ev.tq_attention(scheme, 3)(module, q, k, v, None)
        extra = 0 if split else extra
        kq, vq = make_quantizers(dim, 3 + extra, 2 + extra, seed=2 * layer)
        kc = k.double() - k.double().mean(-2, keepdim=True) if center else k.double()
        s = kc.pow(2).mean(-2, keepdim=True).sqrt() if scale else torch.ones(1, 2, 1, dim)
        s = s.maximum(s.max(-1, keepdim=True).values / 32).double()
        kc = (kc / s).float()
        v_mean = v.mean(-2, keepdim=True) if vcenter else torch.zeros(1, 2, 1, dim)
        k_hat = ev.round_trip(kq, kc).double()
        v_hat = (ev.round_trip(vq, v - v_mean) + v_mean).double()
        if split:
            low = make_quantizers(dim // 2, 3, 2, seed=2 * layer)
            high = make_quantizers(dim // 2, 4, 3, seed=2 * layer)
            k_hat = split_round_trip(kc, low[0], high[0]).double()
            v_hat = split_round_trip(v, low[1], high[1]).double()
        qs = q.double() * s.repeat_interleave(2, 1)
        for i in range(length):
            exact = [j < sinks or i - window < j for j in range(i + 1)]
            keys = torch.stack([kc.double()[:, :, j] if e else k_hat[:, :, j]
                                for j, e in enumerate(exact)], 2).repeat_interleave(2, 1)
            values = torch.stack([v.double()[:, :, j] if e else v_hat[:, :, j]
                                  for j, e in enumerate(exact)], 2).repeat_interleave(2, 1)
            p = torch.softmax(qs[:, :, i:i + 1] @ keys.mT / math.sqrt(dim), -1)
            torch.testing.assert_close(out[:, i].double(), (p @ values)[:, :, 0], rtol=0,
                                       atol=1e-5)


def test_eager_tq_rows_equal_the_backend_without_eager_levers():
    """tq_attention (the eager path of the window / sinks / edges rows) with none of those
    levers gives the logits of the compiled backend in simulate mode (same quantizers, same
    centring and scaling)."""
    model = ev.random_llama()
    ids = torch.randint(512, (1, 40), generator=torch.Generator().manual_seed(3))
    scheme = ev.Scheme("tq", 4, 3, scale_keys=True)
    with torch.no_grad():
        eager = ev._AttentionSwap(model, "tq_eval_test", ev.tq_attention(scheme, 2))(ids)
        compiled = ev._Compiled(model, scheme, 2)(ids)
        exact = model(input_ids=ids).logits
    # a key on a codebook boundary may round either way in the two float paths (one code of
    # ~10^4 flips): compare the mean change, a thousandth of what quantization does
    assert (eager - compiled).abs().mean() < 1e-3 * (eager - exact).abs().mean()
    assert (eager - exact).abs().mean() > 0.1


def test_swapped_attention_gets_the_sliding_window_mask():
    """An attention function swapped in by the tool sees the masks "sdpa" sees: on a random
    Gemma 3 with a sliding window of 4 over 12 tokens, passing sdpa through unchanged gives the
    model's logits (without the mask function, sliding layers got no mask and attended to all
    earlier tokens)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention"],
                              attn_implementation="sdpa")
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model(input_ids=ids).logits
        swapped = ev._AttentionSwap(model, "tq_eval_passthrough", sdpa_attention_forward)(ids)
    torch.testing.assert_close(swapped, exact, rtol=0, atol=1e-6)


def test_eager_levers_count_their_bits():
    d, layers = 64, 4
    edges = ev.Scheme("tq", 3, 2, edge_bits=1)
    assert edges.eager and edges.name == "tq K3/V2 mse +center +edges1"
    assert ev.bits_per_element(edges, d, 32, layers) == pytest.approx(
        (3.5 + 16 / d, 2.5 + 16 / d))
    assert ev.default_schemes([(4, 3)], levers=("edges",), baselines=False, windows=(0, 8),
                              sinks=2)[1:] == [
        ev.Scheme("tq", 4, 3), ev.Scheme("tq", 4, 3, edge_bits=1),
        ev.Scheme("tq", 4, 3, window=8, sinks=2),
        ev.Scheme("tq", 4, 3, window=8, sinks=2, edge_bits=1)]
    split = ev.Scheme("tq", 2, 2, split=True)  # 32 channels at 3 bits, 32 at 2, two norms
    assert split.eager and ev.bits_per_element(split, d, 32, layers) == pytest.approx(
        (2.5 + 32 / d, 2.5 + 32 / d))
    assert ev.bits_per_element(ev.Scheme("tq", 3, 3, "prod", split=True), d, 32, 1)[0] == \
        pytest.approx(3.5 + 64 / d)  # 2/3-bit codes + 1 sign each, two norms per part
    assert [s.name for s in ev.default_schemes([(4, 3)], levers=("vcenter",),
                                               baselines=False)[1:]] == [
        "tq K4/V3 mse +center", "tq K4/V3 mse +center +vcenter"]
    with pytest.raises(ValueError, match="edge_bits"):
        ev.Scheme("tq", 8, 4, edge_bits=1)
    with pytest.raises(ValueError, match="window"):
        ev.Scheme("kivi", 4, 4, window=8)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="stride"):
        list(ev.windows(100, 10, 11))
    with pytest.raises(ValueError, match="k_bits"):
        ev.Scheme("tq", 0, 4)
    with pytest.raises(ValueError, match="method"):
        ev.Scheme("int4", 4, 4)
    with pytest.raises(ValueError, match="float16 range"):  # scale 1e5 / 15 fits, zero doesn't
        ev.fake_quantize(torch.tensor([[-1e5, 0.0]]), 4, -1)
    for argv in (["--bits", "4-4"], ["--text", "prose.txt"], ["--key-quantizer", "int"],
                 ["--levers", "sinks"], ["--fp-window", "a"]):
        with pytest.raises(SystemExit):
            ev.main(argv)


def test_windows_score_each_token_once():
    scored = []
    for begin, end, first in ev.windows(23, 8, 3):
        assert begin < first <= end and end - begin <= 8
        scored += range(first, end)
    assert scored == list(range(1, 23))


def test_perplexity_and_kl_match_a_direct_computation():
    """The uncompressed row's perplexity and a tq row's mean KL equal what full-sequence logits
    give when each scored token is taken from its window by hand (the tool keeps only the
    scored positions' logits and reduces them in chunks)."""
    model = ev.random_llama()
    ids = torch.randint(512, (50,), generator=torch.Generator().manual_seed(4))
    scheme = ev.Scheme("tq", 2, 2, window=3)
    rows = ev.evaluate(model, ids, [ev.Scheme("uncompressed"), scheme], max_length=20,
                       stride=7)
    nll, kl = [], []
    swap = ev._AttentionSwap(model, "tq_eval_direct", ev.tq_attention(scheme, 2))
    with torch.no_grad():
        for begin, end, first in ev.windows(50, 20, 7):
            full = model(input_ids=ids[None, begin:end]).logits[0].double().log_softmax(-1)
            approx = swap(ids[None, begin:end])[0].double().log_softmax(-1)
            for t in range(first, end):  # logits at window row t - 1 - begin predict token t
                nll.append(-full[t - 1 - begin, ids[t]])
                p = full[t - 1 - begin]
                kl.append((p.exp() * (p - approx[t - 1 - begin])).sum())
    # float32 logits of fewer positions may round differently: an off-by-one row would not
    assert math.isclose(rows[0]["perplexity"], math.exp(float(torch.stack(nll).mean())),
                        rel_tol=1e-6)
    assert math.isclose(rows[1]["kl_mean"], float(torch.stack(kl).mean()), rel_tol=1e-4)
    tally, chunked = ev._Tally(), ev._Tally()
    logits, reference = torch.randn(2, 10, 512, generator=torch.Generator().manual_seed(5))
    tally.add(logits, reference, ids[:10])
    chunked.add(logits, reference, ids[:10], rows=3)
    assert math.isclose(tally.nll, chunked.nll, rel_tol=1e-12) and tally.top1 == chunked.top1
    assert torch.equal(torch.cat(tally.kl), torch.cat(chunked.kl))


def test_cli_routes_eval_to_the_tool(capsys):
    """`tq-ops eval` reaches evaluate.main (its own --help), `tq-ops demo` stays the demo's."""
    from tq_ops import cli
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--help"])
    assert info.value.code == 0
    assert "--max-length" in capsys.readouterr().out
