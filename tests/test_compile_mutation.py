"""In-place writes and the attention pass: a write to a site's inputs between reading them and
the site's output leaves the site alone (the rewrite reads them at the output); a write before
or after the site does not.

Oracles: the same function run eagerly on fresh copies of its inputs (site left alone) and the
eager simulation of the compressed attention on the tensors the site reads (site rewritten).
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from test_compile_pass import D, HKV, HQ, qkv, repeat_kv, rewrite_and_run, simulate
from tq_ops.compile import TurboQuantConfig


def method(t):
    t.mul_(4)


def augmented(t):
    t *= 4


def setitem(t):
    t[..., 0] = 3.0


def mul_out(t):
    torch.mul(t, 4, out=t)


def clamp_out(t):
    torch.clamp(t, min=-0.5, out=t)


def relu_inplace(t):
    F.relu(t, inplace=True)


def relu_positional(t):
    F.relu(t, True)


def hardtanh_inplace(t):
    F.hardtanh(t, inplace=True)


def aten_overload(t):
    torch.ops.aten.mul_.Scalar(t, 4)


def aten_packet_out(t):
    torch.ops.aten.add(t, t, out=t)


WRITES = {f.__name__: f for f in (method, augmented, setitem, mul_out, clamp_out, relu_inplace,
                                  relu_positional, hardtanh_inplace, aten_overload,
                                  aten_packet_out)}


def attention(write, where: str, target: str, form: str):
    """An attention site (explicit matmul/softmax, or repeat-KV then SDPA) with `write` applied
    to input `target` ("q", "k" or "v") before the site, inside it or after its output."""

    def fn(q, k, v):
        t = {"q": q, "k": k, "v": v}[target]
        if where == "before":
            write(t)
        if form == "matmul":
            w = F.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
            if where == "inside":
                write(t)
            out = w @ v
        else:
            k2, v2 = repeat_kv(k, 2), repeat_kv(v, 2)
            if where == "inside":
                write(t)
            out = F.scaled_dot_product_attention(q, k2, v2, scale=0.25)
        if where == "after":
            write(t)
        return out

    return fn


class Messages(logging.Handler):
    """The messages logged on the `tq_ops` logger while in use (a context manager)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines, self.logger = [], logging.getLogger("tq_ops")

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def check(write, where, target, form):
    """Compile `attention(...)`, then check the site was rewritten iff the write is outside it,
    against the eager oracle."""
    q, k, v = qkv(HQ if form == "matmul" else HKV)
    fn = attention(write, where, target, form)
    originals = [x.clone() for x in (q, k, v)]
    eager = fn(*[x.clone() for x in originals])
    with Messages() as log:
        out, sites, _ = rewrite_and_run(fn, q, k, v)
    if where == "inside":
        assert sites == [], sites
        assert any("in-place" in m and "inside the attention" in m for m in log.lines), log.lines
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        return
    assert len(sites) == 1, log.lines
    read = (q, k, v) if where == "before" else originals  # what the site saw
    expected = simulate(TurboQuantConfig(), 0, *read, 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    error = ((out - eager).norm() / eager.norm()).item()
    assert error < 0.5, error  # quantization alone


@pytest.mark.parametrize("write", WRITES)
def test_write_to_key_inside_the_site_leaves_it_alone(write):
    check(WRITES[write], "inside", "k", "matmul")


def test_write_to_key_between_repeat_kv_and_sdpa_leaves_it_alone():
    check(mul_out, "inside", "k", "sdpa")


@settings(max_examples=15, deadline=None)
@given(write=st.sampled_from(sorted(WRITES)), where=st.sampled_from(["before", "inside", "after"]),
       target=st.sampled_from("qkv"), form=st.sampled_from(["matmul", "sdpa"]))
def test_property_writes_inside_a_site_block_it_outside_do_not(write, where, target, form):
    torch._dynamo.reset()  # each example is a new graph, not a recompile of the last
    check(WRITES[write], where, target, form)
