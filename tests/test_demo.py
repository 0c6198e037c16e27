"""The demo's table: its byte counts are the real tensor sizes, its errors fall with bits."""

import pytest
import torch

from tq_ops import demo
from tq_ops.quantizer import TurboQuantMSE, TurboQuantProd


@pytest.mark.parametrize("k_bits,v_bits,mode", demo.CONFIGS)
def test_bytes_per_token_are_the_stored_bytes(k_bits, v_bits, mode):
    x = torch.randn(1, 2, 5, 128)
    keys = (TurboQuantProd if mode == "prod" else TurboQuantMSE)(128, k_bits)
    stored_k = sum(t.numel() * t.element_size() for t in keys.quantize(x)) / 10
    stored_v = sum(t.numel() * t.element_size() for t in TurboQuantMSE(128, v_bits).quantize(x)) / 10
    assert demo.bytes_per_token(128, k_bits, v_bits, mode) == (stored_k, stored_v)


def test_errors_fall_with_bits_on_the_demo_model():
    model = demo.tiny_decoder(layers=1)
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0)))
    q, k, v = model[1].captured
    errors = [demo.evaluate(q, k, v, bits, bits, "mse") for bits in (2, 3, 4)]
    for name in ("ip", "v_mse", "attn"):
        assert errors[0][name] > errors[1][name] > errors[2][name] > 0
