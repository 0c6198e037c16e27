"""Serving benchmark: decode steps of a Llama-3.1-8B-shaped transformers model (all 32 layers,
random bf16 weights, one GPU), each step replayed from one CUDA graph.

    PYTHONPATH=. python bench/serve.py [--configs fp16-gqa k4v3 ...] [--contexts 32768 131072]
        [--throughput-context 32768] [--batches N ...] [--steps 20] [--budget-s 330]
    PYTHONPATH=. python bench/serve.py --dry-run      (tiny model on the CPU: checks the script)

Rows: latency (batch 1 at each of --contexts) and throughput (at --throughput-context, the
largest batch whose cache fits, or each of --batches) for each cache configuration:
fp16-gqa (a StaticCache in the model dtype, SDPA with enable_gqa: the baseline), fp16 (the
same cache through transformers' default "sdpa" path, which repeats K/V per query head), and
TurboQuantCache k4v4 / k4v3 / k3v3 (MSE keys) through the "turboquant" backend, and k4v3 with
4 sink and 128 window tokens read exact (k4v3-window).

Compilation: the decoder layer's forward is compiled once per configuration and shape
(`SharedLayers`) and every layer runs through it, each seeing only its own cache layer, so a
32-layer model costs one layer's compile; the eager glue (embedding, mask, rotary, norm,
lm_head) and the 32 compiled layers are captured together in one CUDA graph per shape.

The batch that fits: (free memory after building the model - --reserve-gib) / (cache bytes
per sequence + activation bytes per sequence), the activation bytes being the peak memory of
one batch-1 step beyond its cache (over-counted per sequence, so the batch is a lower
bound); a batch that still runs out of memory is retried at 90%. Caches hold random codes
(timing only); once per run, before the first TurboQuant row, a real 64-token prefill is
decoded one step eagerly and compiled and the logits are compared. Run order (`plan`): every
configuration's rows at the throughput context, then the other latency contexts; no row
starts after --budget-s.
"""

import argparse
import functools
import gc
import itertools
import time

import torch

import decode_model as dm
import harness
from tq_ops.cache import TurboQuantCache
from tq_ops.compile import backend

# name: (label, TurboQuant (k bits, v bits[, sinks, window]) or None for a StaticCache in the
# model dtype, attention);
# "fp16" names the uncompressed cache whether the model runs in float16 or bfloat16
CONFIGS = {
    "fp16-gqa": ("{dtype} StaticCache, SDPA enable_gqa", None, "sdpa_gqa"),
    "k4v4": ("TurboQuantCache K4/V4", (4, 4), "sdpa"),
    "k4v3": ("TurboQuantCache K4/V3", (4, 3), "sdpa"),
    "k3v3": ("TurboQuantCache K3/V3", (3, 3), "sdpa"),
    "k4v3-window": ("TurboQuantCache K4/V3 +sinks4 +window128", (4, 3, 4, 128), "sdpa"),
    "fp16": ("{dtype} StaticCache, transformers sdpa (repeat_kv)", None, "sdpa"),
}
BASELINE = "fp16-gqa"
WARMUP = 3  # eager-compiled steps before capture (compile, then the activation peak)


class _LayerCache:
    """What one decoder layer sees of the cache: `update` goes to this layer whatever
    layer_idx the attention passes, so every layer traces to the same graph."""

    def __init__(self, layer):
        self.layer = layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layer.update(key_states, value_states, *args, **kwargs)


def _layer_forward(forward, layer, view, *args, **kwargs):
    for name in ("past_key_values", "cache"):  # transformers < 5.2x / later spelling
        if name in kwargs:
            kwargs[name] = view
    return forward(layer, *args, **kwargs)


class SharedLayers:
    """The decoder layer's forward compiled once (`dynamic=False`: one graph per shape) and
    installed on every layer of `model`, layer i bound to layer i of a cache."""

    def __init__(self, model, compiler):
        self.layers = model.model.layers
        self.forward = torch.compile(type(self.layers[0]).forward, backend=compiler,
                                     fullgraph=True, dynamic=False)

    def install(self, cache) -> None:
        for layer, cache_layer in zip(self.layers, cache.layers):
            layer.forward = functools.partial(_layer_forward, self.forward, layer,
                                              _LayerCache(cache_layer))

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)


def config_label(name: str, dtype: str) -> str:
    """The table label of configuration `name` for a model in `dtype` ("bfloat16", ...)."""
    return CONFIGS[name][0].format(dtype={"bfloat16": "bf16", "float16": "fp16"}[dtype])


def compiler_for(bits):
    """Plain Inductor for the StaticCache; the "turboquant" backend in cache mode otherwise."""
    return "inductor" if bits is None else backend(mode="cache")


def make_cache(model, bits, context: int, batch: int, device):
    """The configuration's cache, allocated now for `batch` sequences of `context` slots."""
    if bits is None:
        return dm.static_cache(model, context, batch, device)
    k_bits, v_bits, sinks, window = (*bits, 0, 0)[:4]
    return TurboQuantCache(config=model.config, max_cache_len=context, k_bits=k_bits,
                           v_bits=v_bits, max_batch_size=batch, device=device, sinks=sinks,
                           window=window, dtype=model.dtype)


def cache_bytes(cache) -> int:
    if isinstance(cache, TurboQuantCache):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def set_written(cache, length: int) -> None:
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def fill(cache, length: int) -> None:
    """Random contents in every slot, `length` of them counted as written."""
    if isinstance(cache, TurboQuantCache):
        dm.fill_turboquant(cache, length)
    else:
        dm.fill_static(cache, length)


def fit_batch(free: int, reserve: int, per_seq_cache: int, per_seq_act: int) -> int:
    """Largest batch whose cache and activations fit in `free - reserve` bytes (0 if none)."""
    return max(0, (free - reserve) // (per_seq_cache + per_seq_act))


def check_logits(model, shared: SharedLayers, cache, prompt: int = 64) -> float:
    """Relative error of the compiled decode step's logits against the eager step's, both
    after the same eager prefill of `prompt` random tokens (the cache is left dirty)."""
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt + 1), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    shared.remove()
    cache.reset()
    model(ids[:, :prompt], past_key_values=cache)
    eager = model(ids[:, prompt:], past_key_values=cache).logits.float()
    set_written(cache, prompt)  # the compiled step rewrites the same slot
    shared.install(cache)
    compiled = model(ids[:, prompt:], past_key_values=cache).logits.float()
    return ((compiled - eager).norm() / eager.norm()).item()


def peak_extra_bytes(fn, device) -> int:
    """Peak bytes allocated while fn() runs beyond those allocated before (0 on the CPU)."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return torch.cuda.max_memory_allocated() - base


def capture(step):
    """One CUDA graph of step() (compiled already), after a warm-up on a side stream as
    torch.cuda.graph's documentation asks; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def measure(model, shared, bits, context: int, batch: int, args, check: bool) -> dict:
    """Build and fill the cache, compile (first step), measure the activation peak, capture
    the step and time its replays. Returns the row's figures."""
    device = model.device
    cache = make_cache(model, bits, context, batch, device)
    result = dict(context=context, batch=batch, cache_bytes=cache_bytes(cache))
    shared.install(cache)
    start = time.perf_counter()
    if check:
        result["logits_rel_err"] = check_logits(model, shared, cache)
    room = WARMUP + args.steps + 4  # slots written by warm-up steps and timed steps
    filled = context - room
    fill(cache, filled)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def step():
        return model(tokens, past_key_values=cache).logits

    step()
    result["first_step_s"] = time.perf_counter() - start  # compile (and the check)
    for _ in range(WARMUP - 1):
        result["act_bytes"] = peak_extra_bytes(step, device)
    run = step
    if device.type == "cuda":
        try:
            run = capture(step)
        except torch.cuda.OutOfMemoryError:
            raise  # the caller retries at a smaller batch
        except RuntimeError as exc:  # report the row without a graph rather than lose it
            result["note"] = f"not captured ({str(exc).splitlines()[0][:120]}): eager steps"
    set_written(cache, filled)
    ms = (dm.time_steps(lambda _: run(), None, args.steps) if device.type == "cuda"
          else harness.wall_ms(run, args.steps))
    result.update(ms=ms, tokens_s=1e3 * batch / ms)
    del run, cache
    return result


def say(line: str) -> None:
    print(line, flush=True)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fit_note(free: int, args, latency: dict) -> tuple[int, str]:
    """(batch, how it was chosen) from the batch-1 row at the throughput context."""
    per_seq, act = latency["cache_bytes"], latency.get("act_bytes", 0)
    batch = fit_batch(free, int(args.reserve_gib * 2**30), per_seq, act)
    return batch, (f"fits: (free {free / 2**30:.1f} GiB - reserve {args.reserve_gib} GiB) / "
                   f"(cache {per_seq / 2**30:.3f} + activations {act / 2**30:.3f} GiB per "
                   f"sequence) = batch {batch}")


def plan(args) -> list[tuple[str, str, int, object]]:
    """(config, kind, context, batch or "fit") in run order: each configuration's batch-1 row
    at the throughput context and its throughput rows, then the other latency contexts, so the
    rows that a spent --budget-s leaves out are the least needed."""
    context = args.throughput_context
    first = [task for name in args.configs for task in
             [(name, "latency", context, 1)] + [(name, "throughput", context, b)
                                                for b in args.batches or ["fit"]]]
    return first + [(name, "latency", c, 1) for name in args.configs for c in args.contexts
                    if c != context]


def run_config(name, tasks, model, args, free, rows, start) -> None:
    """Consecutive tasks of one configuration, one compiled layer shared by all of them."""
    _, bits, attention = CONFIGS[name]
    label = config_label(name, args.dtype)
    torch._dynamo.reset()
    dm.use_attention(model, attention)
    shared = SharedLayers(model, compiler_for(bits))
    stats = torch._dynamo.utils.counters["stats"]
    graphs, done = stats["unique_graphs"], len(rows)
    try:
        for _, kind, context, wanted in tasks:
            if time.perf_counter() - start > args.budget_s:
                say(f"({label} {kind} at {context}: skipped, over --budget-s)")
                continue
            batch, notes = wanted, []
            if wanted == "fit":
                single = [r for r in rows if (r["config"], r["kind"], r["context"]) ==
                          (name, "latency", context)]
                if not single:
                    say(f"({label} throughput: no batch-1 row at {context} to size it from)")
                    continue
                batch, note = fit_note(free, args, single[0])
                notes.append(note)
            result = None
            while result is None and batch > 0:
                try:
                    check = bits is not None and not args.checked and batch == 1
                    result = measure(model, shared, bits, context, batch, args, check)
                except torch.cuda.OutOfMemoryError:
                    release()
                    notes.append(f"out of memory at batch {batch}, retried at 90%")
                    batch = batch * 9 // 10
            if result is None:
                say(f"({label} {kind} at {context}: no batch ran; {'; '.join(notes)})")
                continue
            if "logits_rel_err" in result:
                args.checked = True
                say(f"(compiled vs eager decode logits after a 64-token prefill, {label}: "
                    f"rel. error {result['logits_rel_err']:.2e})")
            notes += [result.pop("note")] if "note" in result else []
            row = dict(result, config=name, label=label, kind=kind, wanted=wanted,
                       note="; ".join(notes))
            rows.append(row)
            if notes:
                say(f"({label}, {row['note']})")
            say(harness.row(table_row(row, rows)))
            release()
    finally:
        say(f"({label}: {stats['unique_graphs'] - graphs} layer graphs compiled for "
            f"{len(rows) - done} rows of {args.layers} layers)")
        shared.remove()
        release()


def table_row(row: dict, rows: list[dict]) -> list:
    """The row's cells; the ratio is tokens/s over that of the fp16-gqa row of the same kind,
    context and requested batch."""
    base = [r for r in rows if r["config"] == BASELINE and
            (r["kind"], r["context"], r["wanted"]) == (row["kind"], row["context"], row["wanted"])]
    ratio = f"{row['tokens_s'] / base[0]['tokens_s']:.2f}x" if base else ""
    return [row["label"], row["kind"], row["context"], row["batch"],
            f"{row['cache_bytes'] / 1e9:.2f}", row["ms"], f"{row['tokens_s']:.1f}", ratio]


COLUMNS = ["cache", "row", "context", "batch", "cache GB", "ms/step", "tokens/s",
           "vs fp16 enable_gqa"]


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help=f"in this order (default: all; {BASELINE} first gives the ratios)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072],
                        help="latency rows: batch 1 at each context")
    parser.add_argument("--throughput-context", type=int, default=32768)
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="throughput batches (default: the largest that fits)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed replays per row")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--reserve-gib", type=float, default=2.0,
                        help="memory kept free beside the cache and activations")
    parser.add_argument("--budget-s", type=float, default=330,
                        help="start no new row this many seconds after the start")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model, 2 layers, context 128 on the CPU, batch 3, no graphs")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.layers, args.contexts, args.throughput_context = 2, [128], 128
        args.batches, args.steps = args.batches or [3], min(args.steps, 3)
    if args.steps < 1 or args.layers < 1 or min(args.contexts + [args.throughput_context]) <= \
            WARMUP + args.steps + 4:
        parser.error("--steps and --layers must be positive and every context longer than "
                     f"{WARMUP} + steps + 4 slots")
    args.checked = False
    return args


def main(argv=None) -> None:
    start = time.perf_counter()
    args = parse(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch._dynamo.config.recompile_limit = 64  # one graph per shape; layers share them
    harness.header("serving benchmark" + (" (--dry-run)" if args.dry_run else ""), device)
    with torch.no_grad():
        model = dm.build(args.layers, device, getattr(torch, args.dtype), tiny=args.dry_run)
        free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 0
        weights = sum(p.nbytes for p in model.parameters())
        print(f"{args.layers} layers, {args.dtype} weights {weights / 2**30:.1f} GiB; free after "
              f"building the model {free / 2**30:.1f} GiB; median of {args.steps} timed "
              "steps per row\n", flush=True)
        rows: list[dict] = []
        say(harness.table(COLUMNS, []))
        for name, tasks in itertools.groupby(plan(args), key=lambda task: task[0]):
            run_config(name, list(tasks), model, args, free, rows, start)
    print(f"\n## Serving summary ({args.layers} layers, {args.dtype}, one CUDA graph per step)\n")
    print(harness.table(COLUMNS, [table_row(r, rows) for r in rows]))
    for r in rows:
        if r["note"]:
            print(f"{r['label']}, {r['kind']}: {r['note']}")
    print("\nfirst step (compile) s: " + ", ".join(
        f"{r['config']} {r['context']}/{r['batch']} {r['first_step_s']:.0f}" for r in rows))


if __name__ == "__main__":
    main()
