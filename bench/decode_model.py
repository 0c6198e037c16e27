"""Compiled decode step of a transformers Llama: TurboQuantCache + "turboquant" backend vs an
fp16 StaticCache + plain Inductor, both with CUDA graphs (mode="reduce-overhead"). A second
baseline routes attention through SDPA with enable_gqa=True (no per-step repeat_kv copy).

The model has Llama-3.1-8B's layer shape (hidden 4096, 32 query / 8 kv heads of 128, MLP
14336, vocab 128256) with --layers of them (default 8, to keep compile time inside the lease;
per-layer work is that of the 8B model) and random fp16 (or --dtype bfloat16) weights. Both
caches hold --context slots (default 32768), filled with random data, and the step attends
over all of them, as a static cache does. Before timing, the compiled TurboQuant step is
checked against the eager step (decompress + SDPA) on the same state. --fill N writes only N
tokens: the fp16 step still attends over every slot (masked), the TurboQuant step reads the
written ones (the compile pass's kv_lens).

    PYTHONPATH=. python bench/decode_model.py [--layers 32] [--context 32768] [--fill N] [--out DIR]
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tq_ops.cache import TurboQuantCache
from tq_ops.compile import backend


def llama_config(layers: int, tiny: bool = False) -> LlamaConfig:
    """Llama-3.1-8B's layer shape with `layers` layers; tiny: 64 wide, 4 / 2 heads of 16, for
    checking the scripts on a CPU."""
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           vocab_size=128, max_position_embeddings=4096)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)


def build(layers: int, device: str, dtype: torch.dtype, tiny: bool = False):
    """LlamaForCausalLM of `llama_config(layers, tiny)` with random weights, eval mode."""
    config = llama_config(layers, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def fill_turboquant(cache: TurboQuantCache, length: int) -> None:
    """Random packed codes and plausible norms in every slot (in place: no second copy of the
    cache); `length` tokens written."""
    for layer in cache.layers:
        for name in ("k_indices", "v_indices", "k_signs"):
            t = getattr(layer, name)
            if t is not None:
                t.random_(0, 256)
        for name in ("k_norms", "v_norms", "k_residual_norms"):
            t = getattr(layer, name)
            if t is not None:
                t.uniform_(4.0, 12.0)
        layer.cumulative_length.fill_(length)


def fill_static(cache: StaticCache, length: int) -> None:
    for layer in cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
        layer.cumulative_length.fill_(length)


def time_steps(step, token, steps: int) -> float:
    """Median ms per decode step (CUDA events, one step per measurement)."""
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(token)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def bench_turboquant(model, token, args, filled: int) -> dict:
    """Eager reference step, then the compiled (fused) step on the same cache state."""
    cache = TurboQuantCache(config=model.config, max_cache_len=args.context, k_bits=args.k_bits,
                            v_bits=args.v_bits, max_batch_size=1, device=token.device)
    fill_turboquant(cache, filled)
    eager = model(token, past_key_values=cache).logits.float()
    for layer in cache.layers:
        layer.cumulative_length.fill_(filled)
    compiler = backend(mode="cache")  # the quantizers are the cache's
    start = time.perf_counter()
    step = torch.compile(lambda t: model(t, past_key_values=cache).logits, backend=compiler,
                         mode="reduce-overhead", fullgraph=True)
    fused = step(token).float()
    for _ in range(3):
        step(token)
    return {"tq_compile_s": time.perf_counter() - start,
            "tq_vs_eager_rel_err": ((fused - eager).norm() / eager.norm()).item(),
            "tq_sites": [str(s) for s in compiler.sites],
            "tq_ms": time_steps(step, token, args.steps), "tq_cache_bytes": cache.nbytes()}


def sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """HF attention function: SDPA with enable_gqa=True, so the cache is not repeated per
    query head (HF's own "sdpa" repeats K/V whenever there is a mask, i.e. every decode step)."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_attention(model, name: str) -> None:
    """Switch the model to attention implementation `name` ("sdpa": transformers' default;
    "sdpa_gqa": `sdpa_gqa` above, registered on first use)."""
    if name == "sdpa_gqa":
        AttentionInterface.register("sdpa_gqa", sdpa_gqa)
        ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_gqa", sdpa_mask)
    model.set_attn_implementation(name)


def static_cache(model, max_cache_len: int, batch: int, device) -> StaticCache:
    """A StaticCache in the model dtype, allocated now for `batch` sequences on `device`."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    config = model.config
    cache.early_initialization(batch_size=batch, num_heads=config.num_key_value_heads,
                               head_dim=config.head_dim, dtype=model.dtype, device=device)
    return cache


def bench_static(model, token, args, filled: int, prefix: str = "static") -> dict:
    """The same step on a StaticCache in the model dtype, compiled with plain Inductor."""
    cache = static_cache(model, args.context, 1, token.device)
    fill_static(cache, filled)
    start = time.perf_counter()
    step = torch.compile(lambda t: model(t, past_key_values=cache).logits,
                         mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        step(token)
    return {f"{prefix}_compile_s": time.perf_counter() - start,
            f"{prefix}_ms": time_steps(step, token, args.steps),
            f"{prefix}_cache_bytes": sum(layer.keys.nbytes + layer.values.nbytes
                                         for layer in cache.layers)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--k-bits", type=int, default=4)
    parser.add_argument("--v-bits", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--fill", type=int, default=None,
                        help="tokens written before timing (default: all but room for the steps)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    model = build(args.layers, "cuda", getattr(torch, args.dtype))
    token = torch.tensor([[1234]], device="cuda")
    room = 2 * (args.steps + 8)  # slots for warm-up and timed steps
    filled = args.context - room if args.fill is None else args.fill
    if not 0 < filled <= args.context - room:
        parser.error(f"--fill must be in [1, {args.context - room}]")
    results = {"layers": args.layers, "context": args.context, "filled": filled,
               "k_bits": args.k_bits, "v_bits": args.v_bits, "dtype": args.dtype}
    with torch.no_grad():
        results.update(bench_turboquant(model, token, args, filled))
        print("turboquant:", {k: v for k, v in results.items() if k != "tq_sites"}, flush=True)
        torch._dynamo.reset()
        results.update(bench_static(model, token, args, filled))
        print("static:", results["static_ms"], "ms", flush=True)
        torch._dynamo.reset()
        use_attention(model, "sdpa_gqa")
        results.update(bench_static(model, token, args, filled, prefix="static_gqa"))
    results["inductor_counters"] = dict(torch._dynamo.utils.counters["inductor"])
    with open(os.path.join(args.out, "decode_model.json"), "w") as f:
        json.dump(results, f, indent=1)

    print(f"\nLlama-3.1-8B-shaped decode step, {args.layers} layers, {args.dtype} weights, "
          f"{args.context} cache slots ({filled} written), CUDA graphs, median of {args.steps} "
          "steps")
    print(f"fused compiled step vs eager decompress+SDPA: rel. logits error "
          f"{results['tq_vs_eager_rel_err']:.2e}; rewritten sites: {len(results['tq_sites'])}; "
          f"cudagraph skips: {results['inductor_counters'].get('cudagraph_skips', 0)}")
    print("| cache | KV bytes | ms/step | tokens/s |")
    print("|---|---|---|---|")
    for name, key, nbytes in ((f"TurboQuant K{args.k_bits}/V{args.v_bits}", "tq_ms",
                               results["tq_cache_bytes"]),
                              (f"{args.dtype} StaticCache (HF sdpa: repeat_kv)", "static_ms",
                               results["static_cache_bytes"]),
                              (f"{args.dtype} StaticCache (SDPA enable_gqa)", "static_gqa_ms",
                               results["static_gqa_cache_bytes"])):
        print(f"| {name} | {nbytes / 2**30:.3f} GiB | {results[key]:.3f} | "
              f"{1000 / results[key]:.1f} |")


if __name__ == "__main__":
    main()
