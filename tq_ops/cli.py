"""Command line: `tq-ops demo`, `tq-ops eval` (also `python -m tq_ops ...`)."""

import argparse
import sys
import time

from . import demo


def _positive_int(text: str) -> int:
    """argparse type: a positive integer; anything else is a usage error (exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # its own options (tq_ops/evaluate.py); needs transformers
        from . import evaluate
        return evaluate.main(argv[1:])
    parser = argparse.ArgumentParser(prog="tq-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("eval", help="perplexity / KL of a causal LM with a compressed KV cache "
                   "(tq-ops eval --help)")
    d = sub.add_parser("demo", help="compress a small in-code transformer's KV cache")
    d.add_argument("--seq-len", type=_positive_int, default=256, help="prompt tokens (>= 1)")
    d.add_argument("--layers", type=_positive_int, default=2, help="decoder blocks (>= 1)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(demo.run(seq_len=args.seq_len, layers=args.layers))
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return 0
