"""Tensor-parallel greedy generation on a TurboQuant-compressed KV cache.

    torchrun --nproc-per-node 2 examples/tp_generate.py                 # tiny random Llama
    torchrun --nproc-per-node 2 examples/tp_generate.py --model DIR     # a local checkpoint

transformers' own tensor parallelism (`DistributedConfig(tp_plan="auto")`, on torch.distributed
and DTensor) splits every attention's heads over the ranks, so each rank computes attention
over its own KV heads only: each rank's `TurboQuantCache` holds those heads, and the
"turboquant" backend rewrites each rank's local attention to read them packed. The ranks run
on CUDA with NCCL when a GPU is visible (NVLink multicast off: NCCL_NVLS_ENABLE=0 unless set),
else on the CPU with gloo. Without torchrun the same script runs in one process.

Needs `accelerate` (transformers requires it to place a model on devices, as TP does). Without
--model, a small Llama with random weights (4 KV heads) is saved to a temporary directory and
loaded from there, so the tokens are meaningless but the mechanics are the real ones. Rank 0
prints the tokens, every rank's rewritten attention sites and the cache bytes per rank.
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DistributedConfig, LlamaConfig, LlamaForCausalLM

from tq_ops.cache import TurboQuantCache
from tq_ops.compile import backend


def save_tiny_llama(path: str) -> None:
    """Save a 2-layer Llama with random weights (seed 0; 8 query and 4 KV heads of 16) to path.
    The output head is scaled up so that greedy tokens do not hinge on float rounding."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                         vocab_size=128)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load(path: str, device: str, dtype: torch.dtype):
    """The checkpoint at path, split over the torchrun ranks (tp_plan="auto") when there are
    several, else whole on `device`. Under TP each rank's part is on its own device."""
    if world_size() == 1:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto")).eval()


def prompt(vocab_size: int, device: torch.device) -> torch.Tensor:
    """The same 16 token ids (1, 16) on every rank (seeded, drawn on the CPU)."""
    return torch.randint(0, vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)
                         ).to(device)


def new_cache(model, max_cache_len: int, k_bits: int, v_bits: int) -> TurboQuantCache:
    """A cache built as for one process: it takes this rank's KV heads, batch and device from
    the first update's key states."""
    return TurboQuantCache(config=model.config, max_cache_len=max_cache_len, k_bits=k_bits,
                           v_bits=v_bits)


def generate(model, prompt_ids: torch.Tensor, tokens: int, k_bits: int, v_bits: int):
    """Greedy generation of `tokens` new tokens after prompt_ids (B, L), compiled with the
    backend in cache mode. Returns (token ids (B, L + tokens), logits (tokens, B, vocab) in
    float32, the cache, the backend: its `sites` are this process's rewritten attentions)."""
    cache = new_cache(model, prompt_ids.shape[1] + tokens, k_bits, v_bits)
    compiler = backend(mode="cache")  # the quantizers are the cache's
    model.forward = torch.compile(model.forward, backend=compiler, fullgraph=True)
    out = model.generate(prompt_ids, past_key_values=cache, max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    del model.forward  # back to the eager forward
    return out.sequences, torch.stack(out.logits).float(), cache, compiler


def cache_bytes(cache: TurboQuantCache, dtype: torch.dtype) -> tuple[int, int]:
    """(packed bytes, bytes of a StaticCache in `dtype` with the same batch, heads and slots)."""
    static = sum(2 * layer.k_norms.shape[:3].numel() * layer.head_dim * dtype.itemsize
                 for layer in cache.layers)
    return cache.nbytes(), static


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local checkpoint directory (default: tiny random Llama)")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens to generate")
    parser.add_argument("--k-bits", type=int, default=4)
    parser.add_argument("--v-bits", type=int, default=4)
    parser.add_argument("--save", help="directory: each rank writes rank<r>.pt with its results")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.model:
        run(args, args.model)
        return
    with tempfile.TemporaryDirectory() as scratch:
        save_tiny_llama(scratch)  # each rank its own copy: same seed, same weights
        run(args, scratch)


def run(args, model_dir: str) -> None:
    """Load, generate, save this rank's results (--save) and print the ranks' report on rank 0."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = load(model_dir, device, dtype)
    ids, logits, cache, compiler = generate(model, prompt(model.config.vocab_size, model.device),
                                            args.tokens, args.k_bits, args.v_bits)
    rank = dist.get_rank() if dist.is_initialized() else 0
    heads = [layer.k_norms.shape[1] for layer in cache.layers]
    if args.save:
        torch.save({"ids": ids.cpu(), "logits": logits.cpu(), "kv_heads": heads,
                    "sites": [(s.source, s.kind, s.key_shape) for s in compiler.sites]},
                   os.path.join(args.save, f"rank{rank}.pt"))
    report = (rank, ids.cpu(), [str(site) for site in compiler.sites], heads,
              cache_bytes(cache, dtype))
    reports = [report]
    if dist.is_initialized():
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, report)
    if rank == 0:
        print(f"{len(reports)} rank(s), {device}, {dtype}")
        print("generated token ids:", ids[0, -args.tokens:].tolist())
        print("same tokens on every rank:", all(torch.equal(r[1], ids.cpu()) for r in reports))
        for r, _, sites, heads, (packed, static) in reports:
            print(f"\nrank {r}: KV heads per layer {heads}; cache {packed / 2**10:.1f} KiB "
                  f"packed vs {static / 2**10:.1f} KiB for a {str(dtype)[6:]} StaticCache "
                  f"({static / packed:.2f}x smaller); rewritten attention sites ({len(sites)}, "
                  f"one per layer and graph):")
            for site in sites:
                print("  ", site)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
