"""Quantizer constants: one shared copy per (dim, bits, seed, qjl_dim, device), calls on
another device (meta included) that never move a quantizer's own buffers, and the (key, value)
pair `make_quantizers` builds from user settings."""

import pytest
import torch

from tq_ops import TurboQuantMSE, TurboQuantProd
from tq_ops.codebook import lloyd_max
from tq_ops.quantizer import constants, make_quantizers
from tq_ops.rotation import haar_rotation, qjl_matrix


def test_equal_constants_are_one_tensor_object_per_device():
    a, b = TurboQuantProd(16, 3, seed=5), TurboQuantProd(16, 3, seed=5)
    assert a.rotation is b.rotation and a.centroids is b.centroids and a.qjl is b.qjl
    assert TurboQuantMSE(16, 2, seed=5).centroids is a.centroids  # same (dim, index bits)
    assert TurboQuantProd(16, 3, seed=6).rotation is not a.rotation
    assert TurboQuantProd(16, 3, seed=5, qjl_dim=24).qjl.shape == (24, 16)
    # the values are the seeded matrices (an independent draw from the same seed)
    assert torch.equal(a.rotation, haar_rotation(16, 5))
    assert torch.equal(a.qjl, qjl_matrix(16, 16, 5))
    assert torch.equal(a.centroids, lloyd_max(16, 2).float()[2:])  # the upper half (ops form)
    on_meta = constants(16, 2, 5, 16, "meta")
    assert all(t.device.type == "meta" for t in on_meta)
    assert all(x is y for x, y in zip(on_meta, constants(16, 2, 5, 16, torch.device("meta"))))
    assert constants(16, 2, 5, 16, "cpu")[0] is a.rotation
    # contiguous: the launchers pass them as they are (a strided QR factor was copied per call)
    assert all(t.is_contiguous() for t in constants(128, 3, 0, 128))


def test_meta_input_gives_meta_outputs_and_leaves_the_buffers_where_they_were():
    """A call on a meta tensor used to move rotation and codebook to meta for good; later CPU
    calls then failed ("Tensor.item() cannot be called on meta tensors")."""
    x = torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(0))
    for quantizer in (TurboQuantMSE(16, 3, seed=1), TurboQuantProd(16, 3, seed=1)):
        before = [(t, t.device) for t in quantizer.buffers()]
        fields = quantizer.quantize(x.to("meta"))
        assert all(f.device.type == "meta" for f in fields)
        assert quantizer.dequantize(*fields).device.type == "meta"
        assert [(t, t.device) for t in quantizer.buffers()] == before
        got = quantizer.dequantize(*quantizer.quantize(x))
        fresh = type(quantizer)(16, 3, seed=1)
        torch.testing.assert_close(got, fresh.dequantize(*fresh.quantize(x)), rtol=0, atol=0)


def test_make_quantizers_builds_the_pair_of_the_user_settings():
    """Prod keys at k_bits user bits hold k_bits - 1 index bits and qjl_dim QJL rows; values
    are MSE at seed + 1 (the constants of quantizers built by hand from the same settings)."""
    keys, values = make_quantizers(16, 4, 3, "prod", seed=7, qjl_dim=24,
                                   norm_dtype=torch.float32, v_head_dim=32)
    want_k, want_v = TurboQuantProd(16, 4, 7, qjl_dim=24), TurboQuantMSE(32, 3, 8)
    assert type(keys) is TurboQuantProd and type(values) is TurboQuantMSE
    assert (keys.index_bits, values.index_bits, keys.norm_dtype) == (3, 3, torch.float32)
    assert keys.rotation is want_k.rotation and keys.qjl is want_k.qjl
    assert values.rotation is want_v.rotation and values.centroids is want_v.centroids
    mse_keys, _ = make_quantizers(16, 4, 3)
    assert type(mse_keys) is TurboQuantMSE and mse_keys.index_bits == 4 and mse_keys.seed == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(key_quantizer="qjl"), "key_quantizer must be one of"),
    (dict(key_quantizer="mse", qjl_dim=8), "qjl_dim applies to key_quantizer='prod' only"),
])
def test_make_quantizers_refuses_settings_it_cannot_honour(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_quantizers(16, 4, 3, **kwargs)
