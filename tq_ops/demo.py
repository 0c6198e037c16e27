"""`tq-ops demo`: compress the K/V cache of a small in-code transformer and report the cost.

A 2-layer decoder with random weights (no download) runs on a random prompt; each layer's
post-projection q, k, v are captured and compressed. Errors are relative to float32. Weights
and prompt come from the demo's own `torch.Generator`s: the global RNG is neither read nor
reseeded.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .compile import backend
from .ops import attention_args
from .packing import packed_bytes
from .quantizer import make_quantizers


class Block(nn.Module):
    """Pre-norm decoder block; records (q, k, v) of shape (B, H, S, D) on each call."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.captured = None

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        self.captured = (q, k, v)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


def tiny_decoder(vocab=1000, width=512, heads=4, layers=2, seed=0) -> nn.Sequential:
    """Embedding + `layers` blocks, weights drawn from a generator seeded with `seed`."""
    with torch.device("meta"):  # built without drawing from the global RNG
        model = nn.Sequential(nn.Embedding(vocab, width),
                              *[Block(width, heads) for _ in range(layers)])
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(generator=generator)
            elif isinstance(module, nn.Linear):  # uniform(+-1/sqrt(fan_in)), as nn.Linear does
                bound = module.in_features ** -0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
    return model


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.norm() / ref.norm())


def evaluate(q, k, v, k_bits: int, v_bits: int, key_mode: str) -> dict:
    """Errors of one (q, k, v) layer at the given bits; key_mode 'prod' or 'mse'."""
    dim = k.shape[-1]
    keys, values = make_quantizers(dim, k_bits, v_bits, key_mode, seed=1)
    ck, cv = keys.quantize(k), values.quantize(v)
    est = keys.scores(q, *ck)
    true = q @ k.transpose(-1, -2)
    v_hat = values.dequantize(*cv)
    out = torch.ops.tq.attention(*attention_args(q, keys.packed_keys(*ck),
                                                 values.packed_values(*cv), 1 / math.sqrt(dim),
                                                 True))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return {"ip": _rel(est - true, true), "v_mse": _rel(v_hat - v, v) ** 2,
            "attn": _rel(out - ref, ref)}


def bytes_per_token(dim: int, k_bits: int, v_bits: int, key_mode: str) -> tuple[int, int]:
    """(key, value) bytes per token per head with float16 norms."""
    if key_mode == "prod":
        key = packed_bytes(dim, k_bits - 1) + packed_bytes(dim, 1) + 4
    else:
        key = packed_bytes(dim, k_bits) + 2
    return key, packed_bytes(dim, v_bits) + 2


CONFIGS = [(4, 4, "mse"), (4, 4, "prod"), (4, 3, "mse"), (3, 3, "mse"), (3, 3, "prod"),
           (2, 2, "mse"), (2, 2, "prod")]


def run(seq_len: int = 256, layers: int = 2) -> str:
    """Build the model, run a prompt of `seq_len` tokens through `layers` blocks, and return
    the markdown table."""
    checks.int_range("seq_len", seq_len, 1)
    checks.int_range("layers", layers, 1)
    model = tiny_decoder(layers=layers)
    tokens = torch.randint(0, 1000, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens)
        captured = [block.captured for block in model[1:]]
        dim = captured[0][1].shape[-1]
        lines = [f"tiny decoder: {layers} layers, {captured[0][1].shape[1]} heads, head_dim {dim}, "
                 f"{seq_len} tokens, random weights; errors are relative to float32",
                 "", "| K/V bits | keys | bytes/token/head (K+V) | vs fp16 | key q.k error "
                 "| value MSE | attention output error |", "|---|---|---|---|---|---|---|"]
        for k_bits, v_bits, mode in CONFIGS:
            errs = [evaluate(q, k, v, k_bits, v_bits, mode) for q, k, v in captured]
            mean = {name: sum(e[name] for e in errs) / len(errs) for name in errs[0]}
            kb, vb = bytes_per_token(dim, k_bits, v_bits, mode)
            lines.append(f"| K{k_bits}/V{v_bits} | {mode} | {kb}+{vb} = {kb + vb} | "
                         f"{4 * dim / (kb + vb):.2f}x | {mean['ip']:.4f} | {mean['v_mse']:.4f} | "
                         f"{mean['attn']:.4f} |")
        lines += ["", _compiled_summary(model, tokens)]
    return "\n".join(lines)


def _compiled_summary(model: nn.Module, tokens: torch.Tensor) -> str:
    """torch.compile the whole model with the TurboQuant backend (K4/V3, simulate mode)."""
    compiler = backend(k_bits=4, v_bits=3)
    exact = model(tokens)
    compiled = torch.compile(model, backend=compiler, fullgraph=True)(tokens)
    return (f"torch.compile(model, backend=tq_ops.backend(k_bits=4, v_bits=3)): "
            f"{len(compiler.sites)} attention sites rewritten "
            f"({', '.join(sorted({s.kind for s in compiler.sites}))}); final hidden states differ "
            f"from the uncompressed model by {_rel(compiled - exact, exact):.4f} (relative)")
