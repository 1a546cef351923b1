"""Does per-case QC predict failure? Dice of the cases flagged "review" against those passed.

Usage:
    python benchmarks/qc.py --checkpoint runs/demo/checkpoints/last.pt [--cases 40]
        [--tune-seed 2] [--check-seed 1] [--corrupted 10] [--work data/qc_benchmark]

Two sets of phantoms (``liverseg phantoms OUT --cases N --shape 96 96 64 --seed S``): the
TUNING set (``--tune-seed``) and the CHECK set (``--check-seed``; seed 1 is the README's 40
check phantoms), neither trained on. In each, the first ``--corrupted`` cases are also written
corrupted on purpose, three ways: heavy noise (Gaussian, 150 HU), a cropped liver (the scan cut
at the liver's axial middle) and a wrong HU scale (stored + 1024, as a raw unsigned export
without its intercept). Every case is predicted by ``liverseg predict``'s own code
(:func:`liverseg.predict_paths`, no TTA).

The uncertainty thresholds (``liver_entropy``, ``tumor_entropy``) are set on the tuning set
only: the 90th percentile of its clean cases' values. The check set is then predicted with
them and its reports' ``qc`` status is scored against the Dice of each case (``liverseg
evaluate``'s code): mean Dice of the flagged and the passed cases, and how many of the worst
decile (by liver Dice incl. tumor, and by tumor Dice) were flagged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg.evaluation.folders import evaluate_pairs
from liverseg.evaluation.qc import QcThresholds
from liverseg.inference.batch import predict_paths
from liverseg.phantoms import write_dataset

CORRUPTIONS = ("noise", "crop", "hu_offset")
NOISE_HU = 150.0
HU_OFFSET = 1024
PERCENTILE = 90


def make_set(root: Path, cases: int, seed: int, corrupted: int) -> tuple[Path, Path]:
    """Phantoms and their corrupted copies: ``(images folder, labels folder)`` of all cases."""
    images, labels = root / "images", root / "labels"
    if images.is_dir() and len(list(images.glob("*.nii.gz"))) == cases + 3 * corrupted:
        return images, labels
    dataset = write_dataset(root / "phantoms", cases=cases, shape=(96, 96, 64), seed=seed,
                            test_cases=0)  # fmt: skip
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(cases):
        name = f"liver_{index}"
        image = nib.load(dataset / "imagesTr" / f"{name}.nii.gz")
        label = nib.load(dataset / "labelsTr" / f"{name}.nii.gz")
        hu, truth = np.asarray(image.dataobj), np.asarray(label.dataobj)
        _save(images / f"{name}.nii.gz", hu, image.affine)
        _save(labels / f"{name}.nii.gz", truth, image.affine)
        if index >= corrupted:
            continue
        for kind in CORRUPTIONS:
            bad_hu, bad_truth = _corrupt(kind, hu, truth, rng)
            _save(images / f"{name}_{kind}.nii.gz", bad_hu, image.affine)
            _save(labels / f"{name}_{kind}.nii.gz", bad_truth, image.affine)
    return images, labels


def _corrupt(kind: str, hu: np.ndarray, truth: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    if kind == "noise":
        noisy = hu + rng.normal(0.0, NOISE_HU, hu.shape)
        return np.clip(noisy, -1024, 3071).astype(np.int16), truth
    if kind == "hu_offset":
        return (hu.astype(np.int32) + HU_OFFSET).astype(np.int16), truth
    # crop: keep the slices below the liver's axial middle (the phantoms are stored RAS)
    slices = np.flatnonzero((truth > 0).any(axis=(0, 1)))
    middle = int((slices[0] + slices[-1]) // 2)
    return hu[:, :, :middle].copy(), truth[:, :, :middle].copy()


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


def predict_set(checkpoint: Path, images: Path, out: Path, thresholds: QcThresholds) -> None:
    failures = predict_paths(checkpoint, [images], out, overwrite=True, device="cpu",
                             tta_flips=1, qc=thresholds)  # fmt: skip
    if failures:
        raise SystemExit(f"prediction failed: {failures}")


def scored_cases(out: Path, labels: Path) -> list[dict]:
    """Per case: its QC block and its Dice against the truth."""
    reports = {p.name[: -len("_report.json")]: p for p in sorted(out.glob("*_report.json"))}
    pairs = {case: (out / f"{case}_seg.nii.gz", labels / f"{case}.nii.gz") for case in reports}
    evaluation = evaluate_pairs(pairs)
    cases = []
    for row in evaluation.rows:
        qc = json.loads(reports[row["case_id"]].read_text())["qc"]
        kind = next((k for k in CORRUPTIONS if row["case_id"].endswith(k)), "clean")
        dice = {"liver": row["dice_liver_incl_tumor"], "tumor": row["dice_tumor"]}
        cases.append({"case": row["case_id"], "kind": kind, "qc": qc, **dice})
    return cases


def thresholds_from(cases: list[dict]) -> QcThresholds:
    clean = [c["qc"] for c in cases if c["kind"] == "clean"]
    values = {}
    for name in ("liver_entropy", "tumor_entropy"):
        found = [qc[name] for qc in clean if qc[name] is not None]
        values[name] = float(np.percentile(found, PERCENTILE))
    return QcThresholds(**values)


def _mean(values) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return f"{statistics.mean(values):.3f} (n={len(values)})" if values else "-"


def report(cases: list[dict]) -> None:
    flagged = [c for c in cases if c["qc"]["status"] == "review"]
    passed = [c for c in cases if c["qc"]["status"] == "ok"]
    print(f"{'':28s}{'flagged review':>22s}{'passed ok':>22s}")
    print(f"{'cases':28s}{len(flagged):>22d}{len(passed):>22d}")
    for key, name in (("liver", "mean Dice liver incl. tumor"), ("tumor", "mean Dice tumor")):
        print(
            f"{name:28s}{_mean(c[key] for c in flagged):>22s}{_mean(c[key] for c in passed):>22s}"
        )
    for key in ("liver", "tumor"):
        scored = sorted((c for c in cases if not math.isnan(c[key])), key=lambda c: c[key])
        worst = scored[: max(1, round(len(scored) / 10))]
        hit = sum(c["qc"]["status"] == "review" for c in worst)
        print(f"worst decile by {key} Dice ({len(worst)} cases): {hit} flagged "
              f"(Dice {worst[0][key]:.3f}-{worst[-1][key]:.3f})")  # fmt: skip
    clean = [c for c in cases if c["kind"] == "clean"]
    for status in ("review", "ok"):
        group = [c for c in clean if c["qc"]["status"] == status]
        print(
            f"  clean, {status:6s}: {len(group):3d} cases; mean Dice liver "
            f"{_mean(c['liver'] for c in group)}, tumor {_mean(c['tumor'] for c in group)}"
        )
    for kind in ("clean", *CORRUPTIONS):
        group = [c for c in cases if c["kind"] == kind]
        hit = sum(c["qc"]["status"] == "review" for c in group)
        print(
            f"  {kind:10s} {hit:3d} of {len(group):3d} flagged; mean Dice liver "
            f"{_mean(c['liver'] for c in group)}, tumor {_mean(c['tumor'] for c in group)}"
        )
    reasons: dict[str, int] = {}
    for c in flagged:
        for reason in c["qc"]["reasons"]:
            key = reason.split(" (")[0].split(":")[0]
            key = "liver volume outside range" if key.startswith("liver volume") else key
            key = "tumor burden" if key.startswith("tumor burden") else key
            reasons[key] = reasons.get(key, 0) + 1
    print("reasons:", "; ".join(f"{k}: {n}" for k, n in sorted(reasons.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoints/last.pt"))
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--corrupted", type=int, default=10)
    parser.add_argument("--tune-seed", type=int, default=2)
    parser.add_argument("--check-seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("data/qc_benchmark"))
    parser.add_argument("--score-only", action="store_true",
                        help="score the predictions an earlier run left in --work")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tune_images, tune_labels = make_set(args.work / "tune", args.cases, args.tune_seed,
                                        args.corrupted)  # fmt: skip
    check_images, check_labels = make_set(args.work / "check", args.cases, args.check_seed,
                                          args.corrupted)  # fmt: skip
    if not args.score_only:
        predict_set(args.checkpoint, tune_images, args.work / "tune_pred", QcThresholds())
    thresholds = thresholds_from(scored_cases(args.work / "tune_pred", tune_labels))
    print(f"thresholds set on the tuning set (seed {args.tune_seed}, {PERCENTILE}th percentile "
          f"of its clean cases): liver_entropy {thresholds.liver_entropy:.4f}, "
          f"tumor_entropy {thresholds.tumor_entropy:.4f} bits")  # fmt: skip
    if not args.score_only:
        predict_set(args.checkpoint, check_images, args.work / "check_pred", thresholds)
    print(
        f"\ncheck set (seed {args.check_seed}): {args.cases} phantoms + {args.corrupted} x "
        f"{len(CORRUPTIONS)} corrupted ({', '.join(CORRUPTIONS)}), {args.checkpoint}"
    )
    report(scored_cases(args.work / "check_pred", check_labels))


if __name__ == "__main__":
    main()
