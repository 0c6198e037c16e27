"""Generate with a transformers model on a TurboQuant-compressed KV cache, compiled with the
"turboquant" backend.

    python examples/hf_generate.py                      # tiny random Llama, CPU, seconds
    python examples/hf_generate.py --model PATH --device cuda --tokens 64

--model takes a local checkpoint directory (anything AutoModelForCausalLM loads); without it a
small Llama with random weights is built from a config, so the tokens are meaningless but the
mechanics (cache, compile, rewritten sites, memory) are the real ones.
"""

import argparse
import logging

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tq_ops.cache import TurboQuantCache
from tq_ops.compile import backend


def load(path: str | None, device: str, dtype: torch.dtype):
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         vocab_size=1000)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local checkpoint directory (default: tiny random Llama)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens to generate")
    parser.add_argument("--k-bits", type=int, default=4)
    parser.add_argument("--v-bits", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # the pass logs attention it leaves alone
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = load(args.model, args.device, dtype)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=args.device)
    max_len = prompt.shape[1] + args.tokens
    # allocated at the first update, for the prompt's batch size and on its device
    cache = TurboQuantCache(config=model.config, max_cache_len=max_len, k_bits=args.k_bits,
                            v_bits=args.v_bits)

    compiler = backend(mode="cache")  # the quantizers are the cache's
    model.forward = torch.compile(model.forward, backend=compiler, fullgraph=True)
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=args.tokens,
                         do_sample=False)

    print("generated token ids:", out[0, prompt.shape[1]:].tolist())
    print(f"\nrewritten attention sites ({len(compiler.sites)}, one per layer and graph):")
    for site in compiler.sites:
        print("  ", site)
    text = model.config.get_text_config(decoder=True)
    layer = cache.layers[0]
    fp16_bytes = 2 * text.num_hidden_layers * layer.batch_size * layer.num_heads * max_len * \
        layer.head_dim * 2
    print(f"\nKV cache: {cache.nbytes() / 2**20:.3f} MiB packed vs {fp16_bytes / 2**20:.3f} MiB "
          f"for an fp16 StaticCache of the same size ({fp16_bytes / cache.nbytes():.2f}x smaller,"
          f" {(fp16_bytes - cache.nbytes()) / 2**20:.3f} MiB saved)")


if __name__ == "__main__":
    main()
