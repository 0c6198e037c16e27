"""The demo: its byte counts are the real tensor sizes, its errors fall with bits, it checks
its arguments and leaves the global RNG alone."""

import pytest
import torch

from tq_ops import cli, demo
from tq_ops.quantizer import make_quantizers


@pytest.mark.parametrize("k_bits,v_bits,mode", demo.CONFIGS)
def test_bytes_per_token_are_the_stored_bytes(k_bits, v_bits, mode):
    x = torch.randn(1, 2, 5, 128)
    keys, values = make_quantizers(128, k_bits, v_bits, mode)
    stored_k = sum(t.numel() * t.element_size() for t in keys.quantize(x)) / 10
    stored_v = sum(t.numel() * t.element_size() for t in values.quantize(x)) / 10
    assert demo.bytes_per_token(128, k_bits, v_bits, mode) == (stored_k, stored_v)


def test_errors_fall_with_bits_on_the_demo_model():
    model = demo.tiny_decoder(layers=1)
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0)))
    q, k, v = model[1].captured
    errors = [demo.evaluate(q, k, v, bits, bits, "mse") for bits in (2, 3, 4)]
    for name in ("ip", "v_mse", "attn"):
        assert errors[0][name] > errors[1][name] > errors[2][name] > 0


def test_weights_come_from_the_seed_not_the_global_rng():
    first, again = demo.tiny_decoder(layers=1, seed=3), demo.tiny_decoder(layers=1, seed=3)
    other = demo.tiny_decoder(layers=1, seed=4)
    for a, b, c in zip(first.parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b)
        assert a.is_floating_point() and torch.isfinite(a).all()
    linear = first[1].qkv.weight
    assert not torch.equal(linear, other[1].qkv.weight)
    bound = linear.shape[1] ** -0.5  # nn.Linear's default uniform(+-1/sqrt(fan_in))
    assert linear.abs().max() <= bound and linear.std() > 0.9 * bound / 3 ** 0.5


def test_cli_demo_leaves_the_global_rng_alone_and_prints_a_finite_table(capsys):
    state = torch.random.get_rng_state()
    assert cli.main(["demo", "--seq-len", "1", "--layers", "1"]) == 0  # the smallest valid run
    assert torch.equal(torch.random.get_rng_state(), state)
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| K") and "bits" not in line]
    assert len(rows) == len(demo.CONFIGS)
    for row in rows:
        errors = [float(cell) for cell in row.strip("|").split("|")[-3:]]
        assert all(0 < e < 1 for e in errors), row


@pytest.mark.parametrize("argv,option", [
    (["--seq-len", "-1"], "--seq-len"), (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "1.5"], "--seq-len"), (["--layers", "0"], "--layers"),
    (["--layers", "two"], "--layers")])
def test_cli_refuses_bad_demo_arguments_as_usage_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,name", [({"seq_len": 0}, "seq_len"), ({"layers": 0}, "layers"),
                                         ({"seq_len": 2.0}, "seq_len"),
                                         ({"layers": True}, "layers")])
def test_run_refuses_bad_arguments_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        demo.run(**kwargs)
