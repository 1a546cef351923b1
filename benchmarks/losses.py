"""Which loss trains best on the phantoms: the demo config once per loss, same data, split and seed.

Prints, per loss, the held-out Dice of the last epoch's model (liver excl. tumor, liver incl. tumor,
tumor) and the training time, in one run. Every run sees the same phantoms, split, seed, epochs and
patches; only ``train.loss`` changes.

Usage: python benchmarks/losses.py [--config configs/demo.yaml] [--epochs N] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import time

from liverseg.config import load_config
from liverseg.constants import LOSSES
from liverseg.training.fit import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--out", default="runs/losses", help="one run folder per loss below it")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {}
    for loss in LOSSES:
        overrides = [
            *args.overrides,
            f"train.loss={loss}",
            f"run.dir={args.out}/{loss}",
            "run.final_predictions=false",
            "train.resume=never",
        ]
        if args.epochs:
            overrides += [f"train.epochs={args.epochs}", f"train.val_every={args.epochs}"]
        config = load_config(args.config, tuple(overrides))
        started = time.perf_counter()
        result = fit(config)
        results[loss] = (result["metrics"], time.perf_counter() - started)
        print(f"{loss}: {result['metrics']} ({results[loss][1]:.0f} s)", flush=True)
    print(f"\n{args.config}, {config.train.epochs} epochs, held-out Dice of the last epoch's model")
    print(f"{'loss':<10}{'liver excl':>12}{'liver incl':>12}{'tumor':>8}{'seconds':>9}")
    for loss, (m, seconds) in results.items():
        print(
            f"{loss:<10}{m['liver_excl_tumor']:>12.3f}{m['liver_incl_tumor']:>12.3f}"
            f"{m['tumor']:>8.3f}{seconds:>9.0f}"
        )


if __name__ == "__main__":
    main()
