"""Command line: `tq-ops demo` (also `python -m tq_ops demo`)."""

import argparse
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
    parser = argparse.ArgumentParser(prog="tq-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compress a small in-code transformer's KV cache")
    d.add_argument("--seq-len", type=_positive_int, default=256, help="prompt tokens (>= 1)")
    d.add_argument("--layers", type=_positive_int, default=2, help="decoder blocks (>= 1)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(demo.run(seq_len=args.seq_len, layers=args.layers))
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return 0
