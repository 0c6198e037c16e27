"""The "turboquant" backend end to end through Inductor (CPU) on tiny models built from configs.

For each model: the rewritten sites are its attention layers; the compiled output equals an
eager simulation of the same compression (SDPA intercepted by a TorchFunctionMode and computed
with the plain-torch reference ops); and the error against the uncompressed model shrinks with
the bit width. Random weights, no download.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tq_ops import reference
from tq_ops.compile import TurboQuantConfig, backend, site_quantizers

transformers = pytest.importorskip("transformers")

SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


class EagerSimulation(TorchFunctionMode):
    """Replace every SDPA call with TurboQuant attention from the reference ops (call i uses
    the constants of site i)."""

    def __init__(self, config: TurboQuantConfig):
        super().__init__()
        self.config, self.calls = config, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in SDPA:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        a = {"attn_mask": None, "is_causal": False, "scale": None, **dict(zip(names, args)),
             **kwargs}
        q, k, v = a["query"], a["key"], a["value"]
        assert a.get("dropout_p", 0.0) == 0.0 and q.shape[2] == k.shape[2] or not a["is_causal"]
        kq, vq = site_quantizers(self.config, self.calls, k.shape[-1], v.shape[-1])
        self.calls += 1
        k = k - k.mean(-2, keepdim=True) if self.config.center_keys else k
        kc = reference.compress(k, kq.rotation, kq.centroids, kq.qjl, kq.index_bits,
                                torch.float16)
        vc = reference.compress(v, vq.rotation, vq.centroids, None, vq.index_bits, torch.float16)
        scale = a["scale"] if a["scale"] is not None else 1 / math.sqrt(q.shape[-1])
        return reference.attention(q, kq.packed_keys(*kc), vq.packed_values(*vc[:2]), scale,
                                   a["is_causal"], a["attn_mask"], None)


class TinyGPT(nn.Module):
    """A plain PyTorch GPT: pre-norm blocks with causal SDPA attention."""

    def __init__(self, vocab=128, dim=64, heads=4, layers=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim),
            "proj": nn.Linear(dim, dim),
            "norm2": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                                             nn.Linear(4 * dim, dim)),
        }) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        b, s, d = x.shape
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](x)).view(b, s, 3, self.heads, -1).unbind(2)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True)
            x = x + block["proj"](att.transpose(1, 2).reshape(b, s, d))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(x)


def tiny_hf(name: str):
    """(model, inputs, layer count, eager-attention implementation to use for the reference)."""
    t = transformers
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 128}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    if name == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**small, num_key_value_heads=2))
    elif name == "mistral":
        model = t.MistralForCausalLM(t.MistralConfig(**small, num_key_value_heads=1,
                                                     sliding_window=None))
    elif name == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                               bos_token_id=0, eos_token_id=0,
                                               attn_implementation="eager"))
    elif name == "bert":
        model = t.BertModel(t.BertConfig(**small))
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0  # padding
        return model.eval(), {"input_ids": ids, "attention_mask": mask}
    return model.eval(), {"input_ids": ids, "use_cache": False}


def assert_same_up_to_rare_code_flips(got, want):
    """Equal within 1e-4, except that Inductor's float rounding of K/V may move an entry across
    a quantization boundary, which changes a few elements slightly (none on the dev machine)."""
    far = (got - want).abs() > 1e-4 * (1 + want.abs())
    assert far.float().mean() <= 0.01 and relative_error(got, want) < 1e-2, (
        far.float().mean().item(), relative_error(got, want))


def output_of(result):
    return result if isinstance(result, torch.Tensor) else result[0]


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


MODELS = ["llama", "mistral", "gpt2", "bert", "tinygpt"]


@pytest.mark.parametrize("name", MODELS)
def test_backend_rewrites_every_attention_layer(name):
    torch.manual_seed(0)
    if name == "tinygpt":
        model = TinyGPT().eval()
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        inputs = {"ids": ids}
    else:
        model, inputs = tiny_hf(name)
    config = TurboQuantConfig(k_bits=4, v_bits=3)
    compiler = backend(k_bits=4, v_bits=3)
    with torch.no_grad():
        exact = output_of(model(**inputs))
        compiled = output_of(torch.compile(model, backend=compiler, fullgraph=True)(**inputs))
        if name == "gpt2":  # the reference intercepts SDPA: same weights, SDPA attention
            model.set_attn_implementation("sdpa")
        errors = {}
        for bits in (2, 4, 8):
            with EagerSimulation(TurboQuantConfig(k_bits=bits, v_bits=bits)) as mode:
                errors[bits] = relative_error(output_of(model(**inputs)), exact)
            assert mode.calls == 2
        with EagerSimulation(config):
            simulated = output_of(model(**inputs))
    assert len(compiler.sites) == 2  # one per layer
    expected_kind = "matmul" if name == "gpt2" else "sdpa"
    assert {s.kind.split("+")[0] for s in compiler.sites} == {expected_kind}
    assert all(s.source == "simulate" for s in compiler.sites)
    assert_same_up_to_rare_code_flips(compiled, simulated)
    error = relative_error(compiled, exact)
    assert errors[8] * 2.5 < errors[4] < errors[2] / 2.5, errors  # error ~ sqrt(D_b) ~ 2^-b
    assert errors[8] < 0.01 and 0.3 * errors[4] < error < 3 * errors[4] < 0.5, (error, errors)


def test_model_without_attention_is_bitwise_identical():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16),
                          nn.Softmax(dim=-1)).eval()
    x = torch.randn(4, 16)
    compiler = backend()
    with torch.no_grad():
        plain = torch.compile(model, backend="inductor")(x)
        torch._dynamo.reset()
        rewritten = torch.compile(model, backend=compiler)(x)
    assert compiler.sites == []
    assert torch.equal(plain, rewritten)


class SelfAttention(nn.Module):
    """One causal self-attention layer over (B, L, dim) with head_dim = dim // heads."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.qkv, self.heads = nn.Linear(dim, 3 * dim), heads

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).transpose(1, 3).unbind(2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("first_len", [8, 16])  # 8 value centroids; 16 key centroids = head_dim
def test_dynamic_shapes_compile_once_when_a_length_equals_a_constant_size(first_len):
    model = SelfAttention().eval()
    compiler, graphs = backend(k_bits=4, v_bits=3), []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return compiler(gm, example_inputs)

    compiled = torch.compile(model, backend=counting, dynamic=True)
    with torch.no_grad():
        for length in (first_len, first_len + 5):
            x = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(length))
            out = compiled(x)
            with EagerSimulation(TurboQuantConfig(k_bits=4, v_bits=3)):
                assert_same_up_to_rare_code_flips(out, model(x))
    assert len(graphs) == 1 and len(compiler.sites) == 1
