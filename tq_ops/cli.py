"""Command line: `tq-ops demo` (also `python -m tq_ops demo`)."""

import argparse
import time

from . import demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tq-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compress a small in-code transformer's KV cache")
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(demo.run(seq_len=args.seq_len, layers=args.layers))
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return 0
