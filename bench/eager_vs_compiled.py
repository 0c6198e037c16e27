"""Compiled decode logits (fused `tq::attention` on the packed K/V) against eager ones
(`tq::read_cache` decompresses K/V to the states' dtype, then transformers' attention), per
model dtype, on a random 16-layer Llama after a 64-token prefill (CPU or CUDA).

Shows how much of the gap between the two paths is the dtype's rounding of the decompressed
K/V in the eager path: run `PYTHONPATH=. python bench/eager_vs_compiled.py [--device cuda]`.
"""

import argparse

import torch
import transformers

from tq_ops import TurboQuantCache, backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    device = torch.device(parser.parse_args().device)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, head_dim=64,
                                      num_hidden_layers=16, num_attention_heads=8,
                                      num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(config).eval().to(device)
    ids = torch.randint(0, 256, (1, 65), generator=torch.Generator().manual_seed(1)).to(device)
    print("| model dtype | compiled vs eager logits, relative error |\n|---|---|")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model.to(dtype)
        with torch.no_grad():
            cache = TurboQuantCache(config=config, max_cache_len=80, k_bits=4, v_bits=4)
            model(ids[:, :64], past_key_values=cache)
            eager = model(ids[:, 64:], past_key_values=cache).logits.float()
            for layer in cache.layers:  # the compiled step rewrites the same slot
                layer.cumulative_length.fill_(64)
            step = torch.compile(model, backend=backend(mode="cache"), fullgraph=True)
            compiled = step(ids[:, 64:], past_key_values=cache).logits.float()
            torch._dynamo.reset()
        print(f"| {str(dtype).removeprefix('torch.')} | "
              f"{((compiled - eager).norm() / eager.norm()).item():.1e} |", flush=True)


if __name__ == "__main__":
    main()
