"""CUDA: the "turboquant" backend with the Triton kernels, TurboQuantCache under CUDA graphs."""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

transformers = pytest.importorskip("transformers")

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
    kc = reference.compress(k.cpu(), kq.rotation, kq.centroids, None, kq.index_bits,
                            torch.float16)
    vc = reference.compress(v.cpu(), vq.rotation, vq.centroids, None, vq.index_bits,
                            torch.float16)
    want = reference.attention(q.cpu(), kc[0], kc[1], None, None, kq.rotation, kq.centroids,
                               None, kq.index_bits, vc[0], vc[1], vq.rotation, vq.centroids,
                               vq.index_bits, 1 / math.sqrt(64), True, None, None)
    assert len(compiler.sites) == 1
    error = ((out.cpu() - want).norm() / want.norm()).item()
    assert error < 1e-2, error
