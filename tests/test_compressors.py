"""The seed-compatible API: the documented examples, field names, real bytes."""

import dataclasses

import pytest
import torch

from tq_ops import (CompressedKeys, CompressedValues, TurboQuantCompressorMSE,
                    TurboQuantCompressorV2)


def test_documented_examples_run_unchanged():
    key_states = torch.randn(2, 8, 50, 128, dtype=torch.float16)
    value_states = torch.randn(2, 8, 50, 128, dtype=torch.float16)
    query = torch.randn(2, 8, 3, 128, dtype=torch.float16)
    # module docstring example
    key_comp = TurboQuantCompressorV2(head_dim=128, bits=3)
    val_comp = TurboQuantCompressorMSE(head_dim=128, bits=3)
    compressed_k = key_comp.compress(key_states)
    compressed_v = val_comp.compress(value_states)
    scores = key_comp.asymmetric_attention_scores(query, compressed_k)
    values = val_comp.decompress(compressed_v)
    assert scores.shape == (2, 8, 3, 50) and scores.dtype == torch.float16
    assert values.shape == value_states.shape and values.dtype == torch.float16
    # class examples
    comp = TurboQuantCompressorV2(head_dim=128)
    ck = comp.compress(key_states)
    assert ck.indices.shape[:3] == (2, 8, 50)
    cv = TurboQuantCompressorMSE(head_dim=128).compress(value_states)
    assert cv.indices.shape[:3] == (2, 8, 50)
    reconstructed = TurboQuantCompressorMSE(head_dim=128, bits=3).decompress(compressed_v)
    rel = (reconstructed.float() - value_states.float()).norm() / value_states.float().norm()
    assert rel.item() ** 2 < 0.04  # 3-bit D_mse = 0.034
    assert comp.bits == 3 and comp.head_dim == 128 and comp.quantizer.bits == 3


def test_fields_and_original_dtype():
    keys = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    ck = TurboQuantCompressorV2(64, bits=4).compress(keys)
    assert isinstance(ck, CompressedKeys) and ck.original_dtype == torch.bfloat16
    # the seed's fields in the seed's order (positional construction works), then ours
    assert [f.name for f in dataclasses.fields(ck)] == [
        "indices", "norms", "qjl_signs", "residual_norms", "original_dtype", "compressed_by"]
    assert TurboQuantCompressorV2(64, bits=4).decompress(ck).dtype == torch.bfloat16
    cv = TurboQuantCompressorMSE(64, bits=4).compress(keys.float())
    assert isinstance(cv, CompressedValues) and cv.original_dtype == torch.float32


def test_bytes_per_token_per_head_at_d128():
    keys = torch.randn(1, 4, 10, 128, dtype=torch.float16)
    per_token = {}
    for bits in (3, 4):
        per_token["K", bits] = TurboQuantCompressorV2(128, bits).compress(keys).nbytes / 40
        per_token["V", bits] = TurboQuantCompressorMSE(128, bits).compress(keys).nbytes / 40
    assert per_token == {("K", 3): 52, ("V", 3): 50, ("K", 4): 68, ("V", 4): 66}


def test_scores_are_unbiased_over_the_random_matrices():
    """For one fixed (q, k) pair with cos 0.9, the estimate averaged over fresh seeds (fresh
    Pi and S) is the true logit. The earlier package's QJL (S pre-scaled by 1/sqrt(m)) left
    about the (b-1)-bit MSE bias, -11.6% of the logit here."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 1, 128, generator=gen)
    noise = torch.randn(1, 1, 1, 128, generator=gen)
    q = 0.9 * k / k.norm() + 0.43 * noise / noise.norm()
    truth = (q @ k.mT).item()
    compressors = [TurboQuantCompressorV2(128, bits=3, seed=seed) for seed in range(300)]
    estimates = torch.tensor([c.asymmetric_attention_scores(q, c.compress(k)).item()
                              for c in compressors])
    err = estimates - truth
    assert err.mean().abs() < 3 * err.std() / 300**0.5
    assert err.mean().abs() < 0.03 * abs(truth)


def test_float64_is_compressed_as_float32_and_returned_as_float64():
    """The earlier package computed float64 input in float32 (`.float()`) and cast back."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 5, 64, dtype=torch.float64, generator=gen)
    query = torch.randn(1, 4, 3, 64, dtype=torch.float64, generator=gen)
    kc, vc = TurboQuantCompressorV2(64, bits=4), TurboQuantCompressorMSE(64, bits=3)
    ck, ck32 = kc.compress(keys), kc.compress(keys.float())
    assert ck.original_dtype == torch.float64 and torch.equal(ck.indices, ck32.indices)
    k_hat = kc.decompress(ck)
    assert k_hat.dtype == torch.float64
    torch.testing.assert_close(k_hat, kc.decompress(ck32).double())
    scores = kc.asymmetric_attention_scores(query, ck)
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, kc.asymmetric_attention_scores(query.float(), ck).double())
    v_hat = vc.decompress(vc.compress(keys))
    assert v_hat.dtype == torch.float64
    assert ((v_hat - keys).norm() / keys.norm()).item() ** 2 < 0.05  # 3-bit D_mse = 0.034


def test_norm_dtype_stores_norms_beyond_float16():
    """The overflow error says "pass norm_dtype=torch.float32": the compressors take it."""
    keys = torch.randn(1, 2, 4, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="norm_dtype=torch.float32"):
        TurboQuantCompressorV2(64).compress(keys * 1e5)
    for comp_type in (TurboQuantCompressorV2, TurboQuantCompressorMSE):
        wide = comp_type(64, bits=4, norm_dtype=torch.float32)
        big, small = wide.compress(keys * 1e5), wide.compress(keys)
        assert big.norms.dtype == torch.float32 and torch.equal(big.indices, small.indices)
        torch.testing.assert_close(big.norms, keys.norm(dim=-1, keepdim=True) * 1e5)
        want = wide.decompress(small) * 1e5  # (a few QJL signs of near-0 projections flip)
        assert ((wide.decompress(big) - want).norm() / want.norm()).item() < 1e-3


def test_a_compressor_refuses_the_other_container():
    keys = torch.randn(1, 2, 4, 64)
    kc, vc = TurboQuantCompressorV2(64, bits=3), TurboQuantCompressorMSE(64, bits=2)
    ck, cv = kc.compress(keys), vc.compress(keys)  # same packed index width (2 bits)
    with pytest.raises(TypeError, match="compressed must be a CompressedValues"):
        vc.decompress(ck)  # used to decode the keys' MSE part with the wrong rotation
    with pytest.raises(TypeError, match="compressed must be a CompressedKeys"):
        kc.decompress(cv)
    with pytest.raises(TypeError, match="compressed must be a CompressedKeys"):
        kc.asymmetric_attention_scores(keys, cv)


def test_a_compressor_refuses_data_of_another_seed_or_width():
    keys = torch.randn(1, 2, 4, 64)
    for comp_type in (TurboQuantCompressorV2, TurboQuantCompressorMSE):
        ours = comp_type(64, bits=3, seed=1)
        data = ours.compress(keys)
        torch.testing.assert_close(ours.decompress(data),
                                   ours.decompress(dataclasses.replace(data, compressed_by=None)))
        for other in (comp_type(64, bits=3, seed=2),  # same shapes: decoded silently before
                      comp_type(64, bits=3, seed=1, norm_dtype=torch.float32)):
            with pytest.raises(ValueError, match="compressed by a compressor with"):
                other.decompress(data)
    with pytest.raises(ValueError, match="compressed by a compressor with"):
        TurboQuantCompressorV2(64, bits=3, seed=2).asymmetric_attention_scores(
            keys, TurboQuantCompressorV2(64, bits=3, seed=1).compress(keys))


@pytest.mark.parametrize("value", [1e-50, 1e-39, 1e50])
def test_float64_input_beyond_the_float32_range_is_refused(value):
    """float64 is compressed in float32: a vector of 1e-50s became a zero vector (stored as
    norm 0, no error); norms float32 cannot hold are refused, naming the argument."""
    comp = TurboQuantCompressorMSE(16, 3, norm_dtype=torch.float32)
    x = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    x[0, 0, 1] = value
    with pytest.raises(ValueError, match="values has vectors with norms in .*rescale the input"):
        comp.compress(x)
    x[0, 0, 1] = 1e-30  # within range: stored to float32 precision
    norms = comp.compress(x).norms.double().flatten()
    truth = torch.linalg.vector_norm(x, dim=-1).flatten()
    assert torch.allclose(norms, truth, rtol=2 ** -21, atol=0)
