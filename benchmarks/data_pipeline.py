"""Patches per second and peak RAM: liverseg's cached pipeline against the seed's plain one.

Plain (as the seed describes it): every volume read from ``.nii.gz``, ToCanonical, HU window,
CropOrPad to the training shape, whole-volume ``RandomAffine``, ``tio.LabelSampler``,
``tio.Queue``. Ours: :mod:`liverseg.training.loader` (preprocessed once into memory-mapped
``.npy`` by :mod:`liverseg.training.cache`; label-probability centres and augmentation of a patch
with a margin by :mod:`liverseg.training.patches`, cut in the workers).
Same phantoms, same patch size, probabilities, samples per volume, workers and batch, in one run;
each pipeline runs in its own process so its peak RAM (process tree, sampled) is its own.

Patches per second per core divides by the cores the pipeline could use: its workers, or
``os.cpu_count()`` where that is smaller.

Usage: python benchmarks/data_pipeline.py [--cases 6] [--shape 256 256 200] [--patches 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROBS = {0: 0.2, 1: 0.3, 2: 0.5}


class PeakRss:
    """Samples the RSS of this process and its children every 50 ms; keeps the peak."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except Exception:  # a worker may exit between listing and reading
                pass
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def plain_loader(root: Path, args):
    import torch
    import torchio as tio

    from liverseg.data.cases import find_cases

    subjects = [
        tio.Subject(image=tio.ScalarImage(c.image), label=tio.LabelMap(c.label))
        for c in find_cases(root)
    ]
    transform = tio.Compose(
        [
            tio.ToCanonical(),
            tio.Clamp(-150, 250),
            tio.RescaleIntensity((-1, 1), in_min_max=(-150, 250)),
            tio.CropOrPad(tuple(args.shape), mask_name="label"),
            tio.RandomAffine(scales=(0.9, 1.1), degrees=(-10, 10)),
        ]
    )
    queue = tio.Queue(
        tio.SubjectsDataset(subjects, transform=transform),
        max_length=args.queue_length,
        samples_per_volume=5,
        sampler=tio.LabelSampler(args.patch_size, "label", PROBS),
        num_workers=args.workers,
    )
    return torch.utils.data.DataLoader(queue, batch_size=args.batch_size, num_workers=0)


def ours_loader(root: Path, args, cache: Path):
    from liverseg.data.cases import find_cases
    from liverseg.training.cache import build_cache
    from liverseg.training.loader import PatchSettings, build_loader

    settings = {
        "hu_min": -150.0,
        "hu_max": 250.0,
        "shape": list(args.shape),
        "min_size": args.patch_size,
        "affine_tolerance_mm": 0.01,
        "copy_label_geometry": False,
    }
    started = time.perf_counter()
    cached = build_cache(find_cases(root), cache, settings, workers=args.workers)
    cache_seconds = time.perf_counter() - started
    loader = build_loader(
        cached,
        PatchSettings(args.patch_size, PROBS, 5, True),
        queue_length=args.queue_length,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    return loader, cache_seconds


def measure(name: str, args) -> dict:
    """Run one pipeline in this process: patches per second over args.patches patches."""
    import torch

    torch.set_num_threads(1)
    root = Path(args.data)
    with PeakRss() as rss:
        extra = {}
        if name == "plain":
            loader = plain_loader(root, args)
        else:
            loader, extra["cache_seconds"] = ours_loader(root, args, Path(args.cache))
        started, patches = time.perf_counter(), 0
        while patches < args.patches:
            for batch in loader:
                patches += batch["image"]["data"].shape[0]
                if patches >= args.patches:
                    break
        seconds = time.perf_counter() - started
    return {"patches": patches, "seconds": seconds, "peak_rss_mb": rss.peak / 1e6, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 200))
    parser.add_argument("--patch-size", type=int, default=96)
    parser.add_argument("--patches", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--queue-length", type=int, default=40)
    parser.add_argument("--run", choices=("plain", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(measure(args.run, args)))
        return

    from liverseg.phantoms import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "phantoms"
        started = time.perf_counter()
        write_dataset(data, cases=args.cases, shape=tuple(args.shape), seed=0, test_cases=0)
        print(
            f"{args.cases} phantoms of {tuple(args.shape)} in {time.perf_counter() - started:.0f} s"
        )
        results = {}
        for name in ("plain", "ours"):
            command = [sys.executable, __file__, "--run", name, "--data", str(data)]
            command += ["--cache", str(Path(tmp) / "cache")]
            for key in ("shape", "patch_size", "patches", "workers", "batch_size", "queue_length"):
                value = getattr(args, key)
                command += [
                    f"--{key.replace('_', '-')}",
                    *map(str, value if isinstance(value, (list, tuple)) else [value]),
                ]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    print(
        f"\n{args.patches} patches of {args.patch_size}^3, {args.workers} workers, "
        f"batch {args.batch_size}, volumes {tuple(args.shape)}"
    )
    cores, which = pipeline_cores(args.workers)
    print(f"{'pipeline':<10}{'patches/s':>12}{'patches/s/core':>16}{'peak RAM MB':>14}")
    for name, r in results.items():
        rate = r["patches"] / r["seconds"]
        print(f"{name:<10}{rate:>12.2f}{rate / cores:>16.2f}{r['peak_rss_mb']:>14.0f}")
    print(f"per core: patches/s / {cores} cores ({which})")
    print(f"one-off preprocessing into the cache: {results['ours']['cache_seconds']:.1f} s")
    plain = results["plain"]["patches"] / results["plain"]["seconds"]
    ours = results["ours"]["patches"] / results["ours"]["seconds"]
    print(f"speed-up (ours / plain patches per second): {ours / plain:.2f}x (target >= 10x)")


def pipeline_cores(workers: int) -> tuple[int, str]:
    """The CPU cores a pipeline with ``workers`` loader workers can use, and why that many.

    The workers cut the patches; the main process only gathers them. So the workers count, or
    the machine's cores where there are fewer (no workers: the main process, one core).
    """
    available = os.cpu_count() or 1
    if workers == 0:
        return 1, "no workers: the main process"
    if workers <= available:
        return workers, f"the {workers} workers"
    return available, f"os.cpu_count(), fewer than the {workers} workers"


if __name__ == "__main__":
    main()
