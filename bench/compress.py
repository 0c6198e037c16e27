"""Benchmark the Triton compress kernels on one CUDA GPU.

Run from the repository root: `PYTHONPATH=. python bench/compress.py [--sweep] [--ties]`.
Input: fp16 (1, 8, 65536, 128). Measures the device copy bandwidth in the same run (large
device-to-device copy, bytes read + written), then per case the median device time of the
launcher replayed from a CUDA graph (bandwidth figures use it) and the median eager time
through `torch.ops.tq.compress` / `compress_into` (host overhead and the op's checks
included), bytes read + written, achieved TB/s, input-read TB/s, vectors/s and % of copy
bandwidth. --sweep times every tuning config; --ties compares the full-size outputs with the
CPU reference and with float64 ground truth and reports the mismatch rates; --bits limits the
cases (default 4 3).
Prints a markdown table last.
"""

import argparse

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

import harness
from tq_ops import reference
from tq_ops.kernels import compress as kernels
from tq_ops.packing import unpack
from tq_ops.quantizer import make_quantizers

SHAPE = (1, 8, 65536, 128)


def median_ms(fn) -> float:
    """Median ms per call with the host in the loop (eager)."""
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_ms(fn) -> float:
    """Median ms per call replayed from a CUDA graph: device time without launch overhead."""
    return do_bench_cudagraph(fn, rep=50, return_mode="median")


def quantizer(kind: str, bits: int):
    q = make_quantizers(SHAPE[-1], bits, bits, kind, seed=7)[0]
    return q.to("cuda")


def io_bytes(x, outputs) -> tuple[int, int]:
    """(bytes read, bytes written): the input once, every output once (constants ignored)."""
    return x.numel() * x.element_size(), sum(t.numel() * t.element_size() for t in outputs)


def run_case(label, x, q, path: str, copy_tbs: float) -> dict:
    """Device time (graph replay of the launcher) and eager time (through torch.ops.tq)."""
    args = (x, q.rotation, q.centroids, q.qjl, q.index_bits)
    outputs = torch.ops.tq.compress(*args, torch.float16)
    if path == "compress":
        launch = lambda: kernels.compress(*args, torch.float16)  # noqa: E731
        eager = lambda: torch.ops.tq.compress(*args, torch.float16)  # noqa: E731
    else:
        buffers = [torch.empty_like(t) if t.shape[-1] else None for t in outputs]
        positions = torch.randperm(x.shape[2], device="cuda")
        launch = lambda: kernels.compress_into(*args, positions, *buffers)  # noqa: E731
        eager = lambda: torch.ops.tq.compress_into(*args, positions, *buffers)  # noqa: E731
    launch()
    key = (x.shape[-1], 0 if q.qjl is None else q.qjl.shape[0], q.index_bits, q.qjl is not None,
           True, True)  # D, M_QJL, BITS, HAS_QJL, X_FP16, SYM: the variant that does the work
    config = next(c for k, c in kernels._compress_tuned.cache.items() if tuple(k[:6]) == key)
    ms = graph_ms(launch)
    read, written = io_bytes(x, [t for t in outputs if t.shape[-1]])
    vectors = x.numel() // x.shape[-1]
    return dict(case=label, path=path, ms=ms, eager_ms=median_ms(eager), mb=(read + written) / 1e6,
                tbs=(read + written) / ms / 1e9, in_tbs=read / ms / 1e9,
                mvec=vectors / ms / 1e3, pct=100 * (read + written) / ms / 1e9 / copy_tbs,
                config=config)


def sweep(x, q, label: str) -> list[str]:
    """Device time of each tuning config alone (the autotuner's cache is reset per config)."""
    tuned = kernels._compress_tuned
    every = list(tuned.configs)
    lines = []
    for config in every:
        tuned.configs, tuned.cache = [config], {}
        fn = lambda: kernels.compress(x, q.rotation, q.centroids, q.qjl,  # noqa: E731
                                      q.index_bits, torch.float16)
        fn()
        lines.append(f"{label}: {config} -> {graph_ms(fn) * 1e3:.1f} us")
    tuned.configs, tuned.cache = every, {}
    return lines


def ties(x, q, label: str) -> str:
    """Codes of the kernel and of the fp32 CPU reference against float64 ground truth (the
    bucket of each rotated unit-vector coordinate), with the largest distance to a boundary
    among the misses; then kernel vs reference: differing codes, sign bits (Prod) and the
    largest relative norm difference."""
    out = [t.cpu() for t in kernels.compress(x, q.rotation, q.centroids, q.qjl, q.index_bits,
                                             torch.float16)]
    ref = reference.compress(x.cpu(), q.rotation.cpu(), q.centroids.cpu(),
                             None if q.qjl is None else q.qjl.cpu(), q.index_bits, torch.float16)
    xd = x.cpu().double()
    yd = xd / torch.linalg.vector_norm(xd, dim=-1, keepdim=True) @ q.rotation.cpu().double().T
    bounds = (q.centroids[1:] + q.centroids[:-1]).cpu().double() / 2
    truth = torch.bucketize(yd, bounds)
    codes = {name: unpack(packed, q.index_bits, x.shape[-1])
             for name, packed in (("kernel", out[0]), ("fp32 reference", ref[0]))}
    wrong = []
    for name, got in codes.items():
        bad = got != truth
        gap = (yd[..., None] - bounds).abs().amin(-1)[bad] if bad.any() else torch.zeros(1)
        wrong.append(f"{name} {int(bad.sum())} (max |y - boundary| {float(gap.max()):.1e})")
    differ = int((codes["kernel"] != codes["fp32 reference"]).sum())
    signs = "" if q.qjl is None else f", sign bytes differing {int((out[2] != ref[2]).sum())}"
    norms = float(((out[1].float() - ref[1].float()).abs() / ref[1].float().abs()).max())
    return (f"{label}: codes off float64 truth: " + ", ".join(wrong) + f"; kernel vs fp32 "
            f"reference: codes differing {differ} / {truth.numel()}{signs}, norms max rel. "
            f"diff {norms:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--ties", action="store_true")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    opts = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(SHAPE, device="cuda", dtype=torch.float16)
    copy_tbs = harness.copy_bandwidth()
    cases = [(f"{kind.upper()} {bits}-bit", quantizer(kind, bits))
             for kind in ("mse", "prod") for bits in opts.bits]
    rows = [run_case(label, x, q, path, copy_tbs) for label, q in cases
            for path in ("compress", "compress_into")]
    harness.header("tq compress benchmark")
    print(f"triton {triton.__version__}; input fp16 {SHAPE}; copy bandwidth {copy_tbs:.2f} TB/s "
          f"(read + written)\n")
    print("| case | path | device us | eager us | MB moved | TB/s | input TB/s | M vectors/s "
          "| % of copy | config |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cfg = {k: v for k, v in r["config"].all_kwargs().items() if k in
               ("BLOCK_M", "num_warps", "num_stages")}
        print(f"| {r['case']} | {r['path']} | {r['ms'] * 1e3:.1f} | {r['eager_ms'] * 1e3:.1f} | "
              f"{r['mb']:.1f} | {r['tbs']:.2f} | {r['in_tbs']:.2f} | {r['mvec']:.0f} | "
              f"{r['pct']:.0f} | {cfg} |")
    notes = []
    if opts.sweep:
        for label, q in cases[::len(opts.bits)]:  # the first bit width's cases
            notes += sweep(x, q, label)
    if opts.ties:
        notes += [ties(x, q, label) for label, q in cases[::len(opts.bits)]]
    print("\n".join(notes))


if __name__ == "__main__":
    main()
