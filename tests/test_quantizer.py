"""Quantizer constants: one shared copy per (dim, bits, seed, qjl_dim, device), and calls on
another device (meta included) that never move a quantizer's own buffers."""

import torch

from tq_ops import TurboQuantMSE, TurboQuantProd
from tq_ops.codebook import lloyd_max
from tq_ops.quantizer import constants
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
    assert torch.equal(a.centroids, lloyd_max(16, 2).float())
    on_meta = constants(16, 2, 5, 16, "meta")
    assert all(t.device.type == "meta" for t in on_meta)
    assert all(x is y for x, y in zip(on_meta, constants(16, 2, 5, 16, torch.device("meta"))))
    assert constants(16, 2, 5, 16, "cpu")[0] is a.rotation


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
