"""CUDA: the "turboquant" backend with the Triton kernels, TurboQuantCache under CUDA graphs."""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

transformers = pytest.importorskip("transformers")

from conftest import assert_unchanged, snapshot  # noqa: E402
from tq_ops import reference
from tq_ops.cache import TurboQuantCache
from tq_ops.compile import TurboQuantConfig, backend, site_quantizers

SMALL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512}


def tiny_llama():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).cuda().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaky logits: greedy tokens are robust to rounding
    return model


def prompt():
    return torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1)).cuda()


def test_generation_eager_equals_compiled_under_cuda_graphs():
    model = tiny_llama()
    steps = 32

    def generate(cache):
        return model.generate(prompt(), past_key_values=cache, max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False)[0, 8:]

    eager = generate(TurboQuantCache(config=model.config, max_cache_len=48, device="cuda"))
    compiler = backend(mode="cache")
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    model.forward = torch.compile(model.forward, backend=compiler, mode="reduce-overhead",
                                  fullgraph=True)
    compiled = generate(TurboQuantCache(config=model.config, max_cache_len=48, device="cuda"))
    del model.forward
    assert torch.equal(eager, compiled), (eager, compiled)
    assert [s.source for s in compiler.sites] == ["cache"] * 4  # prefill and decode graphs
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips


def test_simulate_mode_matches_reference_on_cuda():
    """tq::compress and tq::attention through Inductor on CUDA vs the CPU reference."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 64, 64, device="cuda") for _ in range(3))
    config = TurboQuantConfig(k_bits=4, v_bits=3)

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiler = backend(k_bits=4, v_bits=3)
    out = torch.compile(attend, backend=compiler, fullgraph=True)(q, k, v)
    kq, vq = site_quantizers(config, 0, 64, 64)
    keys = k.cpu() - k.cpu().mean(-2, keepdim=True)  # center_keys, the default
    kc = reference.compress(keys, kq.rotation, kq.centroids, None, kq.index_bits,
                            torch.float16)
    vc = reference.compress(v.cpu(), vq.rotation, vq.centroids, None, vq.index_bits,
                            torch.float16)
    want = reference.attention(q.cpu(), kq.packed_keys(*kc), vq.packed_values(*vc[:2]),
                               1 / math.sqrt(64), True, None, None)
    assert len(compiler.sites) == 1
    error = ((out.cpu() - want).norm() / want.norm()).item()
    assert error < 1e-2, error


def test_lazy_cache_allocates_on_the_states_device_and_generates_as_eager():
    """Issue 18: TurboQuantCache(config=..., max_cache_len=...) failed on a GPU ("rotation is on
    cpu but the input is on cuda:0")."""
    model = tiny_llama()
    ids = prompt().expand(2, -1)

    def generate(cache):
        return model.generate(ids, past_key_values=cache, max_new_tokens=8, min_new_tokens=8,
                              do_sample=False)[:, 8:]

    eager_cache = TurboQuantCache(config=model.config, max_cache_len=16)
    eager = generate(eager_cache)
    layers = eager_cache.layers
    assert layers[0].k_indices.device.type == "cuda" and layers[0].batch_size == 2
    assert all(a is b for a, b in zip(layers[0].constants(), layers[1].constants()))
    model.forward = torch.compile(model.forward, backend=backend(mode="cache"), fullgraph=True)
    compiled = generate(TurboQuantCache(config=model.config, max_cache_len=16))
    del model.forward
    assert torch.equal(eager, compiled), (eager, compiled)


def test_compiled_overflow_under_cuda_graphs_changes_nothing_and_raises_next_eager_access():
    """Issue 22 row 4: the CUDA compress kernel skips out-of-range slots, so an overflowing
    compiled step could drop tokens with no error."""
    model = tiny_llama()
    cache = TurboQuantCache(config=model.config, max_cache_len=10)
    step = torch.compile(model, backend=backend(mode="cache"), mode="reduce-overhead",
                         fullgraph=True)
    with torch.no_grad():
        token = model(prompt(), past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(2):
            token = step(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        saved = snapshot(cache)
        step(token, past_key_values=cache)  # slot 10 of 10: refused in the graph
    torch.cuda.synchronize()
    assert_unchanged(cache, saved)
    with pytest.raises(RuntimeError, match="did not fit max_cache_len=10"):
        cache.get_seq_length()
    cache.reset()
    assert int(cache.get_seq_length()) == 0


def test_compiled_update_with_norms_beyond_float16_is_stored_and_flagged():
    config = transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 1})
    cache = TurboQuantCache(config=config, max_cache_len=8)
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys, values = (torch.randn(1, 2, 3, 64, device="cuda", generator=gen) for _ in range(2))
    step = torch.compile(lambda k, v: cache.update(k, v, 0)[0].sum(), fullgraph=True)
    step(keys, values)
    step(keys * 1e5, values)  # a compiled graph cannot raise: stored as inf and flagged
    torch.cuda.synchronize()
    assert torch.isinf(cache.layers[0].k_norms[0, :, 3:6]).all()
    assert torch.isfinite(cache.layers[0].k_norms[0, :, :3]).all()
    with pytest.raises(RuntimeError, match="key_states had non-finite values"):
        cache.check()
