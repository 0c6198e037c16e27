"""Decode and prefill attention from the compressed cache vs fp16 SDPA (CUDA only).

Run from the repository root: `PYTHONPATH=. python bench/attention.py [--sweep] [--quick]
[--prefill] [--kernels] [--profile-once] [--json FILE]`.
Prints Markdown tables: device copy bandwidth, then per (keys, values, batch, context):
time, compressed bytes read, achieved TB/s, the copy-bandwidth floor and the speedup over
fp16 SDPA on an fp16 cache (GQA folded into the query length, as flash-decoding does);
then causal prefill vs SDPA with its decompression step beside that step's bandwidth floor.
Inputs are random packed bytes and norms (speed only);
every timing is the median of CUDA-graph replays (triton.testing.do_bench).
"""

import argparse
import datetime
import functools
import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from tq_ops.codebook import lloyd_max
from tq_ops.kernels import attention as attention_kernels
from tq_ops.packing import packed_bytes
from tq_ops.rotation import haar_rotation, qjl_matrix

Q_HEADS, KV_HEADS, DIM = 32, 8, 128
CUDA = torch.device("cuda")
# (name, key index bits, Prod keys?, value index bits): K4 Prod = 3-bit MSE + 1-bit QJL
CONFIGS = [("K4/V4 prod", 3, True, 4), ("K4/V4 mse", 4, False, 4), ("K4/V3 mse", 4, False, 3),
           ("K3/V3 prod", 2, True, 3), ("K3/V3 mse", 3, False, 3)]


def timed(fn) -> float:
    """Median ms of CUDA-graph replays of fn (captured after one eager warm-up call)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=150, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (TB/s)."""
    src = torch.randn(1 << 29, device=CUDA)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e9


def cache(batch, length, k_bits, prod, v_bits):
    """Random packed K/V of (batch, KV_HEADS, length) and the quantizer constants."""
    def u8(width):
        return torch.randint(0, 256, (batch, KV_HEADS, length, width), dtype=torch.uint8,
                             device=CUDA)

    def norms():
        return (torch.rand(batch, KV_HEADS, length, 1, device=CUDA) + 0.5).half()

    k = dict(k_indices=u8(packed_bytes(DIM, k_bits)), k_norms=norms(),
             k_signs=u8(DIM // 8) if prod else None, k_residual_norms=norms() if prod else None,
             k_rotation=haar_rotation(DIM, 0).to(CUDA),
             k_centroids=lloyd_max(DIM, k_bits).float().to(CUDA),
             k_qjl=qjl_matrix(DIM, DIM, 0).to(CUDA) if prod else None, k_bits=k_bits)
    v = dict(v_indices=u8(packed_bytes(DIM, v_bits)), v_norms=norms(),
             v_rotation=haar_rotation(DIM, 1).to(CUDA),
             v_centroids=lloyd_max(DIM, v_bits).float().to(CUDA), v_bits=v_bits)
    nbytes = sum(t.numel() * t.element_size() for t in (*k.values(), *v.values())
                 if isinstance(t, torch.Tensor) and t.dim() == 4)
    return k, v, nbytes


def tq_call(query, k, v, is_causal, kv_lens, tune=None, mask=None):
    args = (query, k["k_indices"], k["k_norms"], k["k_signs"], k["k_residual_norms"],
            k["k_rotation"], k["k_centroids"], k["k_qjl"], k["k_bits"], v["v_indices"],
            v["v_norms"], v["v_rotation"], v["v_centroids"], v["v_bits"], DIM ** -0.5,
            is_causal, mask, kv_lens)
    if tune is not None:
        return lambda: attention_kernels.fused_attention(*args, tune=tune)
    return lambda: torch.ops.tq.attention(*args)


def sdpa_decode_ms(batch, length) -> float:
    group = Q_HEADS // KV_HEADS
    q = torch.randn(batch, KV_HEADS, group, DIM, device=CUDA, dtype=torch.float16)
    kk = torch.randn(batch, KV_HEADS, length, DIM, device=CUDA, dtype=torch.float16)
    return timed(functools.partial(F.scaled_dot_product_attention, q, kk, torch.randn_like(kk)))


def decode_table(bw, batches, lengths, rows_out):
    print("\n## Decode (Hq 32, Hkv 8, d 128, q_len 1)\n")
    print("| config | batch | context | time ms | bytes MB | TB/s | % copy | floor ms | "
          "SDPA fp16 ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in batches:
        for length in lengths:
            sdpa = sdpa_decode_ms(batch, length)
            rows_out.append(dict(kind="sdpa", batch=batch, length=length, ms=sdpa,
                                 bytes=4 * batch * KV_HEADS * length * DIM))
            print(f"| SDPA fp16 | {batch} | {length} | {sdpa:.3f} | "
                  f"{4 * batch * KV_HEADS * length * DIM / 1e6:.0f} | "
                  f"{4 * batch * KV_HEADS * length * DIM / sdpa / 1e9:.2f} | | | | 1.00 |")
            for name, k_bits, prod, v_bits in CONFIGS:
                k, v, nbytes = cache(batch, length, k_bits, prod, v_bits)
                query = torch.randn(batch, Q_HEADS, 1, DIM, device=CUDA, dtype=torch.float16)
                lens = torch.full((batch,), length, device=CUDA, dtype=torch.int32)
                ms = timed(tq_call(query, k, v, False, lens))
                tbs = nbytes / ms / 1e9
                rows_out.append(dict(kind=name, batch=batch, length=length, ms=ms, bytes=nbytes))
                print(f"| {name} | {batch} | {length} | {ms:.3f} | {nbytes / 1e6:.0f} | "
                      f"{tbs:.2f} | {100 * tbs / bw:.0f}% | {nbytes / bw / 1e9:.3f} | "
                      f"{sdpa:.3f} | {sdpa / ms:.2f} |", flush=True)
                del k, v


def decompress_call(k, v):
    """Decompression of the whole K and V cache to fp16 (what `flash_prefill` runs first)."""
    def run():
        torch.ops.tq.decompress(k["k_indices"], k["k_norms"], k["k_signs"],
                                k["k_residual_norms"], k["k_rotation"], k["k_centroids"],
                                k["k_qjl"], k["k_bits"], torch.float16)
        torch.ops.tq.decompress(v["v_indices"], v["v_norms"], None, None, v["v_rotation"],
                                v["v_centroids"], None, v["v_bits"], torch.float16)
    return run


def prefill_table(bw, lengths, rows_out):
    print("\n## Causal prefill (batch 1, Hq 32, Hkv 8, d 128, fp16 queries)\n")
    print("`tq::attention` serves these by decompression + fp16 SDPA; the fused kernel "
          "(`fused_attention`) is what decode and float masks use. "
          "Decompress: K and V (K4/V4 mse) to fp16, the first step of the tq mse call; its "
          "floor is packed bytes read + fp16 written at the copy bandwidth.\n")
    print("Masked: the causal mask given as a bool tensor (as a transformers prefill does), "
          "served by one SDPA per group head; cache: that mask over twice as many slots, half "
          "of them written (`kv_lens`), as a compiled `TurboQuantCache` prefill sees it, "
          "served by the fused kernel, which stops at `kv_lens`.\n")
    print("| tokens | SDPA fp16 ms | tq K4/V4 prod ms | tq K4/V4 mse ms | fused kernel mse ms | "
          "masked mse ms | cache masked mse ms | tq mse vs SDPA | decompress ms | its floor ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in lengths:
        q = torch.randn(1, Q_HEADS, length, DIM, device=CUDA, dtype=torch.float16)
        kk = torch.randn(1, KV_HEADS, length, DIM, device=CUDA, dtype=torch.float16)
        vv = torch.randn_like(kk)
        sdpa = timed(functools.partial(F.scaled_dot_product_attention, q, kk, vv,
                                       is_causal=True, enable_gqa=True))
        times = []
        for _, k_bits, prod, v_bits in CONFIGS[:2]:
            k, v, nbytes = cache(1, length, k_bits, prod, v_bits)
            times.append(timed(tq_call(q, k, v, True, None)))
        times.append(timed(tq_call(q, k, v, True, None, tune={})))
        causal = torch.ones(length, length, device=CUDA, dtype=torch.bool).tril()
        times.append(timed(tq_call(q, k, v, False, None, mask=causal)))
        unpack = timed(decompress_call(k, v))
        del k, v
        k, v, _ = cache(1, 2 * length, *CONFIGS[1][1:])
        over_slots = torch.cat([causal, torch.zeros_like(causal)], 1)
        lens = torch.full((1,), length, device=CUDA, dtype=torch.int32)
        times.append(timed(tq_call(q, k, v, False, lens, mask=over_slots)))
        floor = (nbytes + 2 * kk.numel() * kk.element_size()) / bw / 1e9
        rows_out.append(dict(kind="prefill", length=length, sdpa=sdpa, tq=times,
                             decompress=unpack))
        print(f"| {length} | {sdpa:.3f} | {times[0]:.3f} | {times[1]:.3f} | {times[2]:.3f} | "
              f"{times[3]:.3f} | {times[4]:.3f} | {sdpa / times[1]:.2f} | {unpack:.3f} | "
              f"{floor:.3f} |", flush=True)


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
    decode at two shapes, then fused causal prefill of 4k tokens (not `flash_prefill`; % copy
    there: compressed bytes only)."""
    print("\n## Sweep (K4/V4 mse)\n")
    print("| case | tune | ms | % copy |\n|---|---|---|---|")
    grid = [{}, dict(BLOCK_N=64), dict(resident=2), dict(resident=8), dict(OUT_BLOCK=16),
            dict(OUT_BLOCK=64), dict(maxnreg=None), dict(num_warps=8)]
    for batch, length in ((32, 32768), (1, 131072)):
        k, v, nbytes = cache(batch, length, 4, False, 4)
        query = torch.randn(batch, Q_HEADS, 1, DIM, device=CUDA, dtype=torch.float16)
        lens = torch.full((batch,), length, device=CUDA, dtype=torch.int32)
        for tune in grid:
            sweep_row(f"decode B{batch} L{length}",
                      lambda t: timed(tq_call(query, k, v, False, lens, t)), tune, nbytes, bw,
                      rows_out)
        del k, v
    k, v, nbytes = cache(1, 4096, 4, False, 4)
    query = torch.randn(1, Q_HEADS, 4096, DIM, device=CUDA, dtype=torch.float16)
    for tune in ([{}] + [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
                         for m, n, w, st in ((128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2),
                                             (64, 32, 4, 3), (128, 32, 4, 2))]):
        sweep_row("prefill 4k", lambda t: timed(tq_call(query, k, v, True, None, t)), tune,
                  nbytes, bw, rows_out)


def kernel_table(points) -> None:
    """Device time of every kernel one op call launches (torch.profiler, 20 eager calls), per
    (batch, context, config): what the fixed cost of small batches is made of."""
    from torch.profiler import ProfilerActivity, profile
    for batch, length, (name, k_bits, prod, v_bits) in points:
        k, v, _ = cache(batch, length, k_bits, prod, v_bits)
        query = torch.randn(batch, Q_HEADS, 1, DIM, device=CUDA, dtype=torch.float16)
        lens = torch.full((batch,), length, device=CUDA, dtype=torch.int32)
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
    k, v, _ = cache(32, 32768, 4, False, 4)
    query = torch.randn(32, Q_HEADS, 1, DIM, device=CUDA, dtype=torch.float16)
    lens = torch.full((32,), 32768, device=CUDA, dtype=torch.int32)
    tq_call(query, k, v, False, lens)()
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel configs")
    parser.add_argument("--quick", action="store_true", help="batch 1/32, context 32k/128k only")
    parser.add_argument("--prefill", action="store_true", help="the prefill table only")
    parser.add_argument("--json", help="write all rows to this file")
    parser.add_argument("--kernels", action="store_true",
                        help="also list the kernels of one call at batch 1 and 32 (profiler)")
    parser.add_argument("--profile-once", action="store_true",
                        help="run one decode call and exit (under ncu -k regex:_attention)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.profile_once:
        return profile_once()
    name = torch.cuda.get_device_name()
    print(f"# tq attention benchmark: {name}, {datetime.date.today()}, torch {torch.__version__}")
    bw = copy_bandwidth()
    print(f"\ncopy bandwidth (read + write): {bw:.2f} TB/s")
    rows: list = []
    if args.kernels:
        kernel_table([(1, 8192, CONFIGS[1]), (1, 131072, CONFIGS[1]), (32, 32768, CONFIGS[0])])
    if args.sweep:
        sweep(bw, rows)
    batches, lengths = ((1, 32), (32768, 131072)) if args.quick else ((1, 8, 32),
                                                                      (8192, 32768, 131072))
    if not args.prefill:
        decode_table(bw, batches, lengths, rows)
    prefill_table(bw, (4096,) if args.quick else (4096, 16384), rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, copy_tbs=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
