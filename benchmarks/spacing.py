"""One physical scale: a model trained at a target spacing against one trained on voxels as stored.

Usage:
    python benchmarks/spacing.py --with runs/demo/checkpoints/last.pt
        --without runs/demo_native/checkpoints/last.pt [--cases 6] [--seed 1] [--threads 2]

``--with``: the demo's model (``data.spacing_mm: [4, 4, 3.7]``: every input resampled to it);
``--without``: the same config trained with ``data.spacing_mm=null`` (``python main.py --config
configs/demo.yaml data.spacing_mm=null run.dir=runs/demo_native``), which sees voxels as stored.
Both were trained on the demo's phantoms, about 4 x 4 x 3.7 mm. Each predicts:

- ``--cases`` phantoms of seed ``--seed`` (never trained on) drawn at the demo's shape
  96 x 96 x 64 (about 4 mm),
- the SAME anatomies drawn at 1.5 mm (same field of view, about 256 x 256 x 160 voxels),
- the real CT fixture ``../shared/fixtures/real_ct_sm.nii.gz`` (liver mask only: liver Dice),

with ``predict_volume`` as ``liverseg predict`` does, and prints liver (incl. tumor) and tumor
Dice (mean over cases; tumor over the cases that have tumor in truth or prediction).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from liverseg.checkpoints import load_model
from liverseg.evaluation.metrics import case_dice, dice_score
from liverseg.geometry import spacing_mm
from liverseg.inference.volume import predict_volume
from liverseg.phantoms import case_seed, generate_case

FIXTURE = Path("../shared/fixtures/real_ct_sm.nii.gz")
FIXTURE_LIVER = Path("../shared/fixtures/real_ct_sm_liver.nii.gz")
FINE_MM = 1.5


def phantom_pairs(cases: int, seed: int):
    """Per case: the anatomy at the demo's 96 x 96 x 64 and at 1.5 mm (same field of view)."""
    for index in range(cases):
        case = case_seed(seed, index)
        coarse = generate_case((96, 96, 64), case)
        fov = np.array([96, 96, 64]) * spacing_mm(coarse[2])
        fine_shape = tuple(int(round(f / FINE_MM)) for f in fov)
        yield coarse, generate_case(fine_shape, case)


def _dice(model, settings, volume) -> dict[str, float]:
    image, label, affine = volume
    labels = predict_volume(model, nib.Nifti1Image(image, affine), settings).labels
    return case_dice(labels, label)


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--with", dest="with_", type=Path, default=Path("runs/demo/checkpoints/last.pt")
    )
    parser.add_argument(
        "--without", type=Path, default=Path("runs/demo_native/checkpoints/last.pt")
    )
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    models = {"with target spacing": load_model(args.with_, "cpu"),
              "without (voxels as stored)": load_model(args.without, "cpu")}  # fmt: skip
    results = {name: {"4 mm": [], "1.5 mm": []} for name in models}
    for coarse, fine in phantom_pairs(args.cases, args.seed):
        for name, (model, settings) in models.items():
            results[name]["4 mm"].append(_dice(model, settings, coarse))
            results[name]["1.5 mm"].append(_dice(model, settings, fine))
    fixture = nib.load(FIXTURE)
    truth = np.asarray(nib.load(FIXTURE_LIVER).dataobj) > 0
    print(
        f"{args.cases} phantoms of seed {args.seed} at 96 x 96 x 64 (~4 mm) and at {FINE_MM} mm; "
        f"fixture {FIXTURE.name} at {' x '.join(f'{s:.2f}' for s in spacing_mm(fixture.affine))} mm"
    )
    print(f"{'model':28s}{'4 mm liver':>12s}{'4 mm tumor':>12s}{'1.5 liver':>12s}"
          f"{'1.5 tumor':>12s}{'fixture liver':>15s}")  # fmt: skip
    for name, (model, settings) in models.items():
        labels = predict_volume(model, fixture, settings).labels
        cells = [
            _mean(row[key] for row in results[name][grid])
            for grid in ("4 mm", "1.5 mm")
            for key in ("liver_incl_tumor", "tumor")
        ]
        cells.append(dice_score(labels > 0, truth))
        print(f"{name:28s}" + "".join(f"{c:12.3f}" for c in cells[:4]) + f"{cells[4]:15.3f}")


if __name__ == "__main__":
    main()
