"""Host cost of one eager decode call, and the kernels one compiled decode layer launches.

    PYTHONPATH=. python bench/host.py [--calls 40] [--configs k4v4 fp16-gqa]

1. Eager `torch.ops.tq.attention` decode (K4/V4 mse, Hq 32 / Hkv 8 / d 128, fp16 queries) at
   batch 1 / 128k and 8 / 32k, with kv_lens (as a cache passes it) and without:
   * host us: wall time of --calls back-to-back eager calls issued while the GPU is held busy
     by a `torch.cuda._sleep` enqueued before them and sized to outlast them, divided by
     --calls. The device never idles and the host never waits for it, so this is the host's
     own time per call (Python, argument checks, launches). If the sleep had ended by the
     time the last call returned, a call waited on the device (a host sync) and the figure is
     marked "waited";
   * syncs: host syncs in one call (`torch.cuda.set_sync_debug_mode("warn")` warnings);
   * eager us: the same calls without the sleep (what an eager caller waits per call);
   * device us: the call replayed from a CUDA graph (no host in the loop).
2. Kernels per compiled decode layer: a 2-layer Llama-3.1-8B-shaped model (bf16, batch 1,
   4k-slot cache half written), its decoder layer compiled as in bench/serve.py without CUDA
   graphs; torch.profiler counts the kernels of one step with 2 layers and with 1 layer run
   (`config.num_hidden_layers`), and the difference is one layer's kernels, listed by name.
"""

import argparse
import collections
import time
import warnings

import torch

import attention as bench_attention
import decode_model as dm
import harness
import serve

SHAPES = [(1, 131072), (8, 32768)]


def sleep_cycles_per_ms() -> float:
    """GPU clock cycles of `torch.cuda._sleep` per ms (timed with CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def host_us(fn, calls: int, cycles_per_ms: float) -> tuple[float, bool]:
    """(host us per call of fn with the GPU held busy, whether a call waited on the device)."""
    fn()
    torch.cuda.synchronize()
    budget_ms = 2.0 * calls + 50  # far above any host cost per call seen
    torch.cuda._sleep(int(budget_ms * cycles_per_ms))
    slept = torch.cuda.Event()
    slept.record()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    waited = slept.query()  # the sleep is over: the loop must have waited for the device
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls, waited


def syncs_per_call(fn) -> int:
    """Host-device synchronisations in one call (the sync debug mode's warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def eager_table(calls: int) -> None:
    print("\n## Eager `tq::attention` decode call, K4/V4 mse (host time)\n")
    print(f"host us: {calls} back-to-back calls behind a GPU sleep that outlasts them "
          "(\"waited\": a call synchronised with the device, so the figure includes waiting); "
          "eager us: the same calls with an idle GPU; device us: CUDA-graph replay.\n")
    columns = ["batch", "context", "kv_lens", "syncs/call", "host us", "eager us", "device us"]
    print(harness.table(columns, []), flush=True)
    cycles = sleep_cycles_per_ms()
    for batch, length in SHAPES:
        k, v, _ = bench_attention.cache(batch, length, "mse", 4, 4)
        query = torch.randn(batch, bench_attention.Q_HEADS, 1, bench_attention.DIM,
                            device="cuda", dtype=torch.float16)
        lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
        for kv_lens in (lens, None):
            fn = bench_attention.tq_call(query, k, v, False, kv_lens)
            host, waited = host_us(fn, calls, cycles)
            eager = 1e3 * harness.wall_ms(lambda: [fn() for _ in range(calls)], 3) / calls
            device = 1e3 * harness.graph_ms(fn)
            print(harness.row([batch, length, "given" if kv_lens is not None else "None",
                               syncs_per_call(fn), f"{host:.0f}" + (" (waited)" if waited else ""),
                               f"{eager:.0f}", f"{device:.0f}"]), flush=True)
        del k, v


def step_kernels(model, step) -> list[str]:
    """Names of the kernels one step launches (torch.profiler; copies and memsets left out)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith(("Memcpy", "Memset"))]


def kind_of(kernel: str) -> str:
    if kernel.startswith("triton_"):
        return "Inductor"
    if kernel.startswith("_"):  # the tq_ops kernels' names (_attention_kernel, ...)
        return "tq Triton"
    return "library"


def layer_kernels(name: str, context: int = 4096) -> None:
    """Print the kernels one compiled decode layer of configuration `name` launches."""
    _, bits, attention = serve.CONFIGS[name]
    label = serve.config_label(name, "bfloat16")
    torch._dynamo.reset()
    model = dm.build(2, "cuda", torch.bfloat16)
    dm.use_attention(model, attention)
    shared = serve.SharedLayers(model, serve.compiler_for(bits))
    cache = serve.make_cache(model, bits, context, 1, model.device)
    serve.fill(cache, context // 2)
    shared.install(cache)
    token = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")

    def step():
        return model(token, past_key_values=cache).logits

    for _ in range(3):
        step()
    counts = []
    for layers in (2, 1):
        model.config.num_hidden_layers = layers
        serve.set_written(cache, context // 2)
        counts.append(collections.Counter(step_kernels(model, step)))
    model.config.num_hidden_layers = 2
    layer = counts[0] - counts[1]
    kinds = collections.Counter()
    for kernel, n in layer.items():
        kinds[kind_of(kernel)] += n
    print(f"\n## Kernels per compiled decode layer: {label} (batch 1, {context} slots)\n")
    print(f"{sum(layer.values())} kernels per layer (" + ", ".join(
        f"{kind} {n}" for kind, n in sorted(kinds.items())) + "); step with 2 layers "
        f"{sum(counts[0].values())}, with 1 layer {sum(counts[1].values())}\n")
    print(harness.table(["kernel", "per layer", "kind"],
                        [[k[:90], n, kind_of(k)] for k, n in sorted(layer.items())]))
    shared.remove()
    del model, cache, shared
    serve.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="back-to-back eager calls timed")
    parser.add_argument("--configs", nargs="*", default=["k4v4", "fp16-gqa"],
                        choices=list(serve.CONFIGS), help="layers whose kernels are counted")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be positive")
    torch.manual_seed(0)
    harness.header("host cost and launches")
    with torch.no_grad():
        eager_table(args.calls)
        for name in args.configs:
            layer_kernels(name)


if __name__ == "__main__":
    main()
