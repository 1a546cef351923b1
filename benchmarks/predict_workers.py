"""Cases per minute of ``liverseg predict`` with 1, 2, ... worker processes, side by side.

Usage:
    python benchmarks/predict_workers.py [--checkpoint runs/demo/checkpoints/last.pt]
        [--cases 8] [--shape 96 96 64] [--workers 1 2] [--device cpu] [--tta 1]
        [--work data/predict_workers_benchmark]

``--cases`` phantoms (``liverseg phantoms OUT --cases K --shape X Y Z --seed 3``, written once
under ``--work``) are predicted by ``liverseg predict``'s own code
(:func:`liverseg.predict_paths`) once per ``--workers`` value, each into an empty folder. The
time is the whole call, as a user waits for it: spawning the workers, each loading the
checkpoint, planning, predicting and merging the summary. Printed per worker count: wall
seconds, cases per minute, the speed-up over the first count, the mean of the ``seconds`` column
of ``summary.csv`` (one case's prediction inside its worker, which grows when workers compete
for cores or memory bandwidth), and whether every label map equals that of the first count.

On CPU the torch threads of this process are divided between the workers
(``torch.get_num_threads() // N``): set ``--threads`` (or ``OMP_NUM_THREADS``) to fix the total.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from liverseg.inference.batch import predict_paths
from liverseg.phantoms import write_dataset


def make_phantoms(work: Path, cases: int, shape: tuple[int, int, int]) -> Path:
    """The phantoms' image folder, written once per ``(cases, shape)``."""
    root = work / f"phantoms_{cases}_{'x'.join(map(str, shape))}"
    images = root / "imagesTr"
    if not (images.is_dir() and len(list(images.glob("liver_*.nii.gz"))) == cases):
        shutil.rmtree(root, ignore_errors=True)
        write_dataset(root, cases=cases, shape=shape, seed=3, test_cases=0)
    return images


def run_once(args, images: Path, workers: int) -> dict:
    """Predict every phantom with ``workers`` processes; the figures of that run."""
    out = args.work / f"out_{workers}_workers"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    failures = predict_paths(
        args.checkpoint, [images], out, device=args.device, tta_flips=args.tta, workers=workers
    )
    wall = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{workers} worker(s): {len(failures)} failures, first {failures[0]}")
    with (out / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "workers": workers,
        "out": out,
        "wall_s": wall,
        "cases_per_min": 60.0 * len(rows) / wall,
        "case_s": statistics.mean(float(row["seconds"]) for row in rows),
        "processes": sorted({row["worker"] for row in rows}),
    }


def same_labels(first: Path, other: Path) -> bool:
    """Whether every segmentation in ``other`` equals the one of the same name in ``first``."""
    for seg in sorted(first.glob("*_seg.nii.gz")):
        a = np.asarray(nib.load(str(seg)).dataobj)
        b = np.asarray(nib.load(str(other / seg.name)).dataobj)
        if not np.array_equal(a, b):
            return False
    return True


def print_table(results: list[dict]) -> None:
    base = results[0]
    print(
        f"{'workers':>7}  {'wall s':>8}  {'cases/min':>9}  {'speed-up':>8}  "
        f"{'case s (mean)':>13}  {'labels = first':>14}  processes"
    )
    for r in results:
        print(
            f"{r['workers']:>7}  {r['wall_s']:>8.1f}  {r['cases_per_min']:>9.2f}  "
            f"{base['wall_s'] / r['wall_s']:>7.2f}x  {r['case_s']:>13.2f}  "
            f"{str(same_labels(base['out'], r['out'])):>14}  {', '.join(r['processes'])}"
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoints/last.pt"))
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="N")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", type=int, default=None, help="mirrored passes (default: checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in all (default: all)")
    p.add_argument("--work", type=Path, default=Path("data/predict_workers_benchmark"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not args.checkpoint.is_file():
        raise SystemExit(f"{args.checkpoint} not found; train one (python main.py) or pass one")
    if args.threads:
        torch.set_num_threads(args.threads)
    images = make_phantoms(args.work, args.cases, tuple(args.shape))
    print(
        f"{args.cases} phantoms of {' x '.join(map(str, args.shape))} voxels, {args.checkpoint}, "
        f"device {args.device}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
        "threads in all"
    )
    print_table([run_once(args, images, workers) for workers in args.workers])


if __name__ == "__main__":  # the workers are spawned: they import this module
    main()
