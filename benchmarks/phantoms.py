"""Seconds to generate one phantom case, against the 2 s target for 128^3.

Usage: python benchmarks/phantoms.py [--shape 128 128 128] [--cases 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from liverseg.phantoms import generate_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128))
    parser.add_argument("--cases", type=int, default=5)
    args = parser.parse_args()
    seconds = []
    for seed in range(args.cases):
        started = time.perf_counter()
        generate_case(tuple(args.shape), seed=seed)
        seconds.append(time.perf_counter() - started)
    print(f"{args.cases} cases of {tuple(args.shape)}: median {statistics.median(seconds):.2f} s, "
          f"max {max(seconds):.2f} s (target for 128^3: < 2 s)")  # fmt: skip


if __name__ == "__main__":
    main()
