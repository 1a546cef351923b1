"""What TTA and a k-fold ensemble buy and cost: Dice and seconds per case on held-out phantoms.

Usage:
    python benchmarks/ensembles.py --folds runs/cv4 [--cases 40] [--seed 1] [--tta 8]
        [--timed 5] [--threads 2] [--data data/phantoms_check]

The phantoms are ``liverseg phantoms DATA --cases 40 --shape 96 96 64 --seed 1`` (the README's
40 check phantoms: another seed than any training set, never trained on or chosen by). The
models are the folds of ``liverseg cv`` (``<folds>/fold_K/checkpoints/last.pt``).

Dice: per case, each fold predicts once plainly and once with ``--tta`` mirrorings
(``predict_volume`` with ``keep_probabilities``); the variants are the averages of those
probabilities, decoded and post-processed as ``liverseg predict`` does:

- each fold alone (the "one fold" row is their mean: what one model gives),
- fold 0 with TTA,
- the ensemble of all folds,
- the ensemble with TTA (each fold's TTA average, averaged: the same as all folds x flips).

Seconds: each variant is run as ``liverseg predict`` runs it (``predict_volume`` with the models
and ``tta_flips``) on the first ``--timed`` cases, the variants one after another per case, so a
slower stretch of the machine hits all alike; the cost column is relative to one fold.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from liverseg.checkpoints import load_models
from liverseg.evaluation.metrics import case_dice
from liverseg.geometry import spacing_mm
from liverseg.inference.postprocess import postprocess_labels
from liverseg.inference.volume import predict_volume
from liverseg.labels import to_labels
from liverseg.phantoms import write_dataset


def _probabilities(models, settings, image, tta: int) -> tuple[list, list]:
    """Per fold: plain probabilities and TTA-averaged probabilities on the input grid."""
    plain, mirrored = [], []
    raw = settings.replace(postprocess=None)
    for model in models:
        plain.append(predict_volume(model, image, raw, keep_probabilities=True).probabilities)
        these = raw.replace(tta_flips=tta)
        mirrored.append(predict_volume(model, image, these, keep_probabilities=True).probabilities)
    return plain, mirrored


def _labels(probabilities: np.ndarray, settings, spacing) -> np.ndarray:
    labels = to_labels(torch.from_numpy(probabilities), settings.head).numpy()
    if settings.postprocess is not None:
        labels = postprocess_labels(labels, spacing, settings.postprocess)
    return labels


def _variants(plain: list, mirrored: list, tta: int) -> dict[str, np.ndarray]:
    variants = {f"fold {k} alone": p for k, p in enumerate(plain)}
    variants[f"fold 0 + TTA {tta}"] = mirrored[0]
    variants[f"{len(plain)}-fold ensemble"] = np.mean(plain, axis=0)
    variants[f"{len(plain)}-fold ensemble + TTA {tta}"] = np.mean(mirrored, axis=0)
    return variants


def _timed(models, settings, image, tta: int) -> dict[str, float]:
    """Seconds of each variant as `liverseg predict` runs it."""
    runs = {f"fold {k} alone": ([m], settings) for k, m in enumerate(models)}
    runs[f"fold 0 + TTA {tta}"] = ([models[0]], settings.replace(tta_flips=tta))
    runs[f"{len(models)}-fold ensemble"] = (models, settings)
    runs[f"{len(models)}-fold ensemble + TTA {tta}"] = (models, settings.replace(tta_flips=tta))
    seconds = {}
    for name, (members, these) in runs.items():
        start = time.perf_counter()
        predict_volume(members, image, these)
        seconds[name] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=Path, default=Path("runs/cv4"))
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("data/phantoms_check"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    if len(list((args.data / "imagesTr").glob("*.nii.gz"))) != args.cases:
        write_dataset(args.data, cases=args.cases, shape=(96, 96, 64), seed=args.seed, test_cases=0)
    checkpoints = sorted(args.folds.glob("fold_*/checkpoints/last.pt"))
    models, settings = load_models(checkpoints, "cpu")
    dice: dict[str, list] = {}
    pooled: dict[str, list] = {}
    seconds: dict[str, list] = {}
    for index in range(args.cases):
        image = nib.load(args.data / "imagesTr" / f"liver_{index}.nii.gz")
        truth = np.asarray(nib.load(args.data / "labelsTr" / f"liver_{index}.nii.gz").dataobj)
        spacing = spacing_mm(image.affine)
        for name, probabilities in _variants(
            *_probabilities(models, settings, image, args.tta), args.tta
        ).items():
            labels = _labels(probabilities, settings, spacing)
            dice.setdefault(name, []).append(case_dice(labels, truth))
            total = pooled.setdefault(name, [0, 0])
            total[0] += 2 * int(np.count_nonzero((labels == 2) & (truth == 2)))
            total[1] += int(np.count_nonzero(labels == 2) + np.count_nonzero(truth == 2))
        if index < args.timed:
            for name, value in _timed(models, settings, image, args.tta).items():
                seconds.setdefault(name, []).append(value)
        print(f"case {index + 1}/{args.cases} done", flush=True)
    _print_table(args, checkpoints, dice, pooled, seconds)


def _print_table(args, checkpoints, dice, pooled, seconds) -> None:
    print(f"\n{args.cases} phantoms (seed {args.seed}); {len(checkpoints)} folds of {args.folds}; "
          f"seconds over the first {args.timed} cases, {args.threads} threads")  # fmt: skip
    singles = [n for n in dice if n.endswith("alone")]
    rows = {"one fold (mean of the folds)": singles}
    rows.update({n: [n] for n in dice if not n.endswith("alone")})
    one = statistics.mean(statistics.mean(seconds[n]) for n in singles)
    print(f"{'':34s}{'liver':>8s}{'tumor':>8s}{'global':>8s}{'s/case':>9s}{'cost':>7s}")
    for row, names in rows.items():
        liver = statistics.mean(_mean(dice[n], "liver_incl_tumor") for n in names)
        tumor = statistics.mean(_mean(dice[n], "tumor") for n in names)
        glob = statistics.mean(pooled[n][0] / pooled[n][1] for n in names)
        per_case = statistics.mean(statistics.mean(seconds[n]) for n in names)
        print(f"{row:34s}{liver:8.3f}{tumor:8.3f}{glob:8.3f}{per_case:9.2f}{per_case / one:6.1f}x")
    for name in singles:
        print(f"  {name}: liver {_mean(dice[name], 'liver_incl_tumor'):.3f}, "
              f"tumor {_mean(dice[name], 'tumor'):.3f}")  # fmt: skip


def _mean(rows: list[dict], key: str) -> float:
    values = [row[key] for row in rows if not math.isnan(row[key])]
    return statistics.mean(values)


if __name__ == "__main__":
    main()
