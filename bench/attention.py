"""Decode and prefill attention from the compressed cache vs fp16 SDPA (CUDA only).

Run from the repository root: `PYTHONPATH=. python bench/attention.py [--quick] [--sweep]
[--prefill] [--kernels] [--profile-once] [--json FILE]`.

The baseline of every table is `F.scaled_dot_product_attention(q (B, Hq, Lq, D), k, v,
enable_gqa=True)` on an fp16 cache (`is_causal=True` for prefill), as PyTorch and transformers
users call it, timed in the same run; "vs SDPA" is its time over the row's (above 1: faster).
Decode tables also show the folded call (the 4 query heads of a group as q_len = 4, no
enable_gqa), labelled as such. Header: GPU, date, commit (harness.git_commit), torch.
Prints Markdown tables: device copy bandwidth, then per (batch, context) the decode time,
bytes read, TB/s and % of copy bandwidth of each row; then causal prefill. Inputs are random
packed bytes and norms (speed only); every timing is the median of CUDA-graph replays.
tq rows go through the public op `torch.ops.tq.attention`; only the tuning sweep and the
fused-kernel prefill row reach into kernels/ (`fused_kernel`).
"""

import argparse
import json
import sys

import torch

import harness
from tq_ops.ops import attention_args
from tq_ops.packed import ExactTokens, PackedKeys, PackedValues
from tq_ops.packing import packed_bytes
from tq_ops.quantizer import make_quantizers

Q_HEADS, KV_HEADS, DIM = 32, 8, 128
GROUP = Q_HEADS // KV_HEADS
DEVICE = torch.device("cuda")  # cpu with --dry-run
# (name, key quantizer, key bits, value bits): K4 prod = 3-bit MSE codes + 1-bit QJL
CONFIGS = [("K4/V4 mse", "mse", 4, 4), ("K4/V3 mse", "mse", 4, 3), ("K3/V3 mse", "mse", 3, 3),
           ("K4/V4 prod", "prod", 4, 4), ("K3/V3 prod", "prod", 3, 3)]
QUICK_CONFIGS = CONFIGS[:4]
SINKS, WINDOW = 4, 128  # rows "+sinks +window": these exact tokens (`ExactTokens`) as well
WINDOWED = ("K4/V3 mse",)  # configs that get such a row
QUICK_SHAPES = [(1, 32768), (1, 131072), (8, 32768), (32, 32768), (32, 131072)]
FULL_SHAPES = [(b, n) for b in (1, 8, 32) for n in (8192, 32768, 131072)]


def fused_kernel():
    """`tq_ops.kernels.attention.fused_attention(query, keys, values, ..., tune=dict)`: the one
    entry into kernel internals (tuning knobs). Raises RuntimeError naming what moved if
    kernels/ changed."""
    try:
        from tq_ops.kernels import attention as kernels
        return kernels.fused_attention
    except (ImportError, AttributeError) as exc:
        raise RuntimeError("bench/attention.py needs tq_ops.kernels.attention.fused_attention"
                           f"(..., tune=) for the tuning rows ({exc}); update fused_kernel() to "
                           "the new location of the fused launcher") from exc


def cache(batch: int, length: int, key_quantizer: str, k_bits: int, v_bits: int):
    """Random packed K/V of (batch, KV_HEADS, length) with the constants of real quantizers
    -> (PackedKeys, PackedValues, bytes of the packed fields)."""
    def u8(width):
        return torch.randint(0, 256, (batch, KV_HEADS, length, width), dtype=torch.uint8,
                             device=DEVICE)

    def norms():
        return (torch.rand(batch, KV_HEADS, length, 1, device=DEVICE) + 0.5).half()

    kq, vq = make_quantizers(DIM, k_bits, v_bits, key_quantizer, seed=0)
    prod = kq.qjl is not None
    k = PackedKeys(u8(packed_bytes(DIM, kq.index_bits)), norms(),
                   u8(packed_bytes(kq.qjl.shape[0], 1)) if prod else None,
                   norms() if prod else None, kq.rotation.to(DEVICE), kq.centroids.to(DEVICE),
                   kq.qjl.to(DEVICE) if prod else None, kq.index_bits)
    v = PackedValues(u8(packed_bytes(DIM, vq.index_bits)), norms(), vq.rotation.to(DEVICE),
                     vq.centroids.to(DEVICE), vq.index_bits)
    nbytes = sum(t.numel() * t.element_size() for t in (*k, *v)
                 if isinstance(t, torch.Tensor) and t.dim() == 4)
    return k, v, nbytes


def tq_call(query, k, v, is_causal, kv_lens, tune=None, mask=None, exact=None):
    """A no-argument call of the public op (or of the fused kernel with `tune` overrides)."""
    packed = (query, k, v, DIM ** -0.5, is_causal, mask, kv_lens, exact)
    if tune is not None:
        fused = fused_kernel()
        return lambda: fused(*packed, tune=tune)
    args = attention_args(*packed)
    return lambda: torch.ops.tq.attention(*args)


def exact_tokens(batch: int, length: int) -> tuple[ExactTokens, int]:
    """Random fp16 SINKS + WINDOW exact tokens whose window ends at `length` -> (tokens,
    bytes)."""
    def slots():
        return torch.randn(batch, KV_HEADS, SINKS + WINDOW, DIM, device=DEVICE,
                           dtype=torch.float16)

    start = torch.full((batch,), max(length - WINDOW, 0), device=DEVICE, dtype=torch.int32)
    exact = ExactTokens(slots(), slots(), start, SINKS)
    return exact, 2 * exact.keys.numel() * exact.keys.element_size()


def timed(fn) -> float:
    return harness.graph_ms(fn, device=DEVICE)


def decode_inputs(batch: int, length: int):
    """fp16 query (B, Hq, 1, D) and K/V (B, Hkv, L, D) of the baseline."""
    q = torch.randn(batch, Q_HEADS, 1, DIM, device=DEVICE, dtype=torch.float16)
    kk = torch.randn(batch, KV_HEADS, length, DIM, device=DEVICE, dtype=torch.float16)
    return q, kk, torch.randn_like(kk)


def sdpa_decode_ms(batch: int, length: int) -> tuple[float, float]:
    """(enable_gqa SDPA ms, folded-call ms) for one decode step over an fp16 cache."""
    q, kk, vv = decode_inputs(batch, length)
    gqa = timed(lambda: harness.sdpa_gqa(q, kk, vv))
    folded_q = q.view(batch, KV_HEADS, GROUP, DIM)  # the group's heads as query rows
    folded = timed(
        lambda: torch.nn.functional.scaled_dot_product_attention(folded_q, kk, vv))
    return gqa, folded


def decode_table(bw, shapes, configs, rows_out):
    print(f"\n## Decode (Hq {Q_HEADS}, Hkv {KV_HEADS}, d {DIM}, q_len 1, fp16 queries)\n")
    print("vs SDPA: SDPA enable_gqa ms / row ms. Folded: SDPA with the 4 heads of a group as "
          "q_len 4, no enable_gqa (the baseline of earlier tables).\n")
    columns = ["config", "batch", "context", "ms", "MB read", "TB/s", "% copy", "vs SDPA"]
    print(harness.table(columns, []), flush=True)
    for batch, length in shapes:
        sdpa, folded = sdpa_decode_ms(batch, length)
        fp16_bytes = 4 * batch * KV_HEADS * length * DIM
        measured = [("SDPA fp16 enable_gqa", sdpa, fp16_bytes),
                    ("SDPA fp16 folded (q_len 4)", folded, fp16_bytes)]
        query = torch.randn(batch, Q_HEADS, 1, DIM, device=DEVICE, dtype=torch.float16)
        lens = torch.full((batch,), length, device=DEVICE, dtype=torch.int32)
        for name, key_quantizer, k_bits, v_bits in configs:
            k, v, nbytes = cache(batch, length, key_quantizer, k_bits, v_bits)
            measured.append((f"tq {name}", timed(tq_call(query, k, v, False, lens)),
                             nbytes))
            if name in WINDOWED:
                exact, exact_bytes = exact_tokens(batch, length)
                measured.append((f"tq {name} +sinks{SINKS} +window{WINDOW}",
                                 timed(tq_call(query, k, v, False, lens, exact=exact)),
                                 nbytes + exact_bytes))
            del k, v
        for name, ms, nbytes in measured:
            tbs = nbytes / ms / 1e9
            rows_out.append(dict(kind=name, batch=batch, length=length, ms=ms, bytes=nbytes,
                                 sdpa_ms=sdpa))
            print(harness.row([name, batch, length, ms, f"{nbytes / 1e6:.0f}", f"{tbs:.2f}",
                               f"{100 * tbs / bw:.0f}%", harness.speedup(sdpa, ms)]), flush=True)


def decompress_call(k, v):
    """Decompression of the whole K and V cache to fp16 (the first step of prefill)."""
    def run():
        torch.ops.tq.decompress(*k, torch.float16)
        torch.ops.tq.decompress(*v.as_keys(), torch.float16)
    return run


def prefill_table(bw, lengths, rows_out):
    print(f"\n## Causal prefill (batch 1, Hq {Q_HEADS}, Hkv {KV_HEADS}, d {DIM}, "
          "fp16 queries)\n")
    print("Rows: `tq::attention` with is_causal (decompression + SDPA); the fused kernel alone "
          "(what decode and float masks use); the causal mask as a bool tensor (as a "
          "transformers prefill passes it); that mask over twice as many slots, half written "
          "(`kv_lens`, a compiled `TurboQuantCache` prefill); decompression of K and V alone "
          "(its floor: packed bytes read + fp16 written at the copy bandwidth).\n")
    columns = ["tokens", "path", "ms", "vs SDPA"]
    print(harness.table(columns, []), flush=True)
    for length in lengths:
        q = torch.randn(1, Q_HEADS, length, DIM, device=DEVICE, dtype=torch.float16)
        kk = torch.randn(1, KV_HEADS, length, DIM, device=DEVICE, dtype=torch.float16)
        vv = torch.randn_like(kk)
        sdpa = timed(lambda: harness.sdpa_gqa(q, kk, vv, is_causal=True))
        times = [("SDPA fp16 enable_gqa, is_causal", sdpa)]
        k, v, nbytes = cache(1, length, *CONFIGS[3][1:])
        times.append(("tq K4/V4 prod", timed(tq_call(q, k, v, True, None))))
        k, v, nbytes = cache(1, length, *CONFIGS[0][1:])
        times.append(("tq K4/V4 mse", timed(tq_call(q, k, v, True, None))))
        try:
            times.append(("fused kernel K4/V4 mse",
                          timed(tq_call(q, k, v, True, None, tune={}))))
        except RuntimeError as exc:
            print(f"(fused kernel row skipped: {exc})")
        causal = torch.ones(length, length, device=DEVICE, dtype=torch.bool).tril()
        times.append(("bool causal mask K4/V4 mse",
                      timed(tq_call(q, k, v, False, None, mask=causal))))
        times.append(("decompress K4/V4 mse", timed(decompress_call(k, v))))
        del k, v
        k, v, _ = cache(1, 2 * length, *CONFIGS[0][1:])
        over_slots = torch.cat([causal, torch.zeros_like(causal)], 1)
        lens = torch.full((1,), length, device=DEVICE, dtype=torch.int32)
        times.append(("cache bool mask K4/V4 mse (2x slots, kv_lens)",
                      timed(tq_call(q, k, v, False, lens, mask=over_slots))))
        floor = (nbytes + 2 * kk.numel() * kk.element_size()) / bw / 1e9
        rows = [[length, name, ms, harness.speedup(sdpa, ms)] for name, ms in times]
        rows.append([length, "decompress floor (copy bandwidth)", floor, ""])
        rows_out += [dict(kind="prefill", length=length, path=name, ms=ms, sdpa_ms=sdpa)
                     for name, ms in times]
        print("\n".join(harness.row(r) for r in rows), flush=True)


def sweep_row(label, ms_of, tune, nbytes, bw, rows_out) -> None:
    """Time one config (ms_of(tune)) and print its row; configs that fail to compile say so."""
    try:
        ms = ms_of(tune)
    except Exception as exc:  # a config that does not compile (resources)
        print(f"| {label} | {tune} | failed: {type(exc).__name__} | |")
        return
    rows_out.append(dict(kind="sweep", case=label, tune=tune, ms=ms))
    print(f"| {label} | {tune} | {ms:.3f} | {100 * nbytes / ms / 1e9 / bw:.0f}% |", flush=True)


def sweep(bw, rows_out):
    """Departures from the default tile / warp / split config of the fused kernel, K4/V4 mse:
    decode at two shapes, then fused causal prefill of 4k tokens (% copy there: compressed
    bytes only)."""
    fused_kernel()  # fails here, with what moved, if kernels/ was re-cut
    print("\n## Sweep (K4/V4 mse)\n")
    print("| case | tune | ms | % copy |\n|---|---|---|---|")
    grid = [{}, dict(BLOCK_N=64), dict(resident=2), dict(resident=8), dict(OUT_BLOCK=16),
            dict(OUT_BLOCK=64), dict(maxnreg=None), dict(num_warps=8)]
    for batch, length in ((32, 32768), (1, 131072)):
        k, v, nbytes = cache(batch, length, *CONFIGS[0][1:])
        query = torch.randn(batch, Q_HEADS, 1, DIM, device=DEVICE, dtype=torch.float16)
        lens = torch.full((batch,), length, device=DEVICE, dtype=torch.int32)
        for tune in grid:
            sweep_row(f"decode B{batch} L{length}",
                      lambda t: timed(tq_call(query, k, v, False, lens, t)), tune,
                      nbytes, bw, rows_out)
        del k, v
    k, v, nbytes = cache(1, 4096, *CONFIGS[0][1:])
    query = torch.randn(1, Q_HEADS, 4096, DIM, device=DEVICE, dtype=torch.float16)
    for tune in ([{}] + [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
                         for m, n, w, st in ((128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2),
                                             (64, 32, 4, 3), (128, 32, 4, 2))]):
        sweep_row("prefill 4k", lambda t: timed(tq_call(query, k, v, True, None, t)),
                  tune, nbytes, bw, rows_out)


def kernel_table(points) -> None:
    """Device time of every kernel one op call launches (torch.profiler, 20 eager calls), per
    (batch, context, config): what the fixed cost of small batches is made of."""
    from torch.profiler import ProfilerActivity, profile
    for batch, length, (name, key_quantizer, k_bits, v_bits) in points:
        k, v, _ = cache(batch, length, key_quantizer, k_bits, v_bits)
        query = torch.randn(batch, Q_HEADS, 1, DIM, device=DEVICE, dtype=torch.float16)
        lens = torch.full((batch,), length, device=DEVICE, dtype=torch.int32)
        fn = tq_call(query, k, v, False, lens)
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        print(f"\n## Kernels of one call: batch {batch}, context {length}, {name} "
              "(device us per call)\n")
        for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if event.device_time_total > 0:
                print(f"| {event.key[:70]} | {event.device_time_total / 20:.1f} |")


def profile_once() -> None:
    """One decode call at batch 32 / 32k, K4/V4 mse, default config: a target for ncu."""
    k, v, _ = cache(32, 32768, *CONFIGS[0][1:])
    query = torch.randn(32, Q_HEADS, 1, DIM, device=DEVICE, dtype=torch.float16)
    lens = torch.full((32,), 32768, device=DEVICE, dtype=torch.int32)
    tq_call(query, k, v, False, lens)()
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="decode at batch/context 1/32k, 1/128k, 8/32k, 32/32k, 32/128k for "
                             "K4/V4, K4/V3, K3/V3 mse and K4/V4 prod; prefill at 4k")
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel configs")
    parser.add_argument("--prefill", action="store_true", help="the prefill table only")
    parser.add_argument("--json", help="write all rows to this file")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU (reference ops, wall-clock times): checks "
                             "the script, not speed")
    parser.add_argument("--kernels", action="store_true",
                        help="also list the kernels of one call at batch 1 and 32 (profiler)")
    parser.add_argument("--profile-once", action="store_true",
                        help="run one decode call and exit (under ncu -k regex:_attention)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.profile_once:
        return profile_once()
    global DEVICE
    if args.dry_run:
        DEVICE = torch.device("cpu")
    title = harness.header("tq attention benchmark" + (" (--quick)" if args.quick else "")
                           + (" (--dry-run)" if args.dry_run else ""), DEVICE)
    bw = float("nan") if args.dry_run else harness.copy_bandwidth()
    print(f"\ncopy bandwidth (read + write): {bw:.2f} TB/s")
    rows: list = []
    if args.kernels:
        kernel_table([(1, 8192, CONFIGS[0]), (1, 131072, CONFIGS[0]), (32, 32768, CONFIGS[3])])
    if args.sweep:
        sweep(bw, rows)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    prefill = (4096,) if args.quick else (4096, 16384)
    if args.dry_run:
        shapes, prefill = [(1, 64), (2, 32)], (32,)
    if not args.prefill:
        decode_table(bw, shapes, QUICK_CONFIGS if args.quick else CONFIGS, rows)
    prefill_table(bw, prefill, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=title, copy_tbs=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
