"""What every benchmark script shares: the run header, CUDA-graph timing, the fp16 SDPA
baseline and Markdown tables. Imported by the scripts beside it (`import harness`).
"""

import datetime
import os
import subprocess
import time

import torch
import torch.nn.functional as F


def git_commit() -> str:
    """The commit under test: $TQ_COMMIT if set (a copy of the tree without .git), else
    `git rev-parse --short HEAD` with "-dirty" for uncommitted changes, else "unknown"."""
    if os.environ.get("TQ_COMMIT"):
        return os.environ["TQ_COMMIT"]
    try:
        def git(*args):
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain",
                                                                       "--untracked-files=no")
                                                      else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header(title: str, device: torch.device | str = "cuda") -> str:
    """'# title: <GPU or CPU>, <date>, commit <hash>, torch <version>' (printed and returned)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    line = (f"# {title}: {name}, {datetime.date.today()}, commit {git_commit()}, "
            f"torch {torch.__version__}")
    print(line, flush=True)
    return line


def graph_ms(fn, warmup_ms: int = 25, rep_ms: int = 150, device: str = "cuda") -> float:
    """Median ms of CUDA-graph replays of fn (captured after one eager warm-up call), the L2
    cache flushed before each replay (triton.testing.do_bench). device "cpu" (dry runs): the
    median wall time of 3 calls."""
    if torch.device(device).type == "cpu":
        return wall_ms(fn, 3)
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def wall_ms(fn, calls: int) -> float:
    """Median wall-clock ms of `calls` calls of fn (host-side timer, device synchronised)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (TB/s)."""
    from triton.testing import do_bench
    src = torch.randn(1 << 29, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e9


def sdpa_gqa(query, key, value, is_causal: bool = False):
    """The fp16 baseline: SDPA on query (B, Hq, Lq, D) and key/value (B, Hkv, Lk, D) with
    enable_gqa=True, as PyTorch and transformers users call it -> (B, Hq, Lq, D)."""
    return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal,
                                          enable_gqa=True)


def speedup(baseline_ms: float, ms: float) -> str:
    """'1.33x': how many times faster than the baseline (above 1: faster)."""
    return f"{baseline_ms / ms:.2f}x"


def row(values: list) -> str:
    """One Markdown table row; floats with 3 decimals, None as an empty cell."""
    def cell(value) -> str:
        if value is None:
            return ""
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    return "| " + " | ".join(cell(v) for v in values) + " |"


def table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table: the header line, the rule, then `row` of each row."""
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + [row(r) for r in rows])
