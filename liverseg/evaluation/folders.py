"""``liverseg evaluate``: compare a folder of predictions with the true labels.

Predictions are ``PRED_DIR/<case>_seg.nii.gz`` (as written by ``liverseg predict``); truths are
``GT_DIR/<case>.nii.gz`` or ``GT_DIR/labelsTr/<case>.nii.gz`` (a Task03 root). Per case: Dice of the
three classes, VOE and RVD, ASSD and HD95 in mm of liver (incl. tumor) and tumor, and lesion
detection counts; then means over cases, global Dice pooled over all voxels of all cases (as LiTS
reports it) and lesion detection pooled over all lesions.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverseg.constants import DICE_CLASSES
from liverseg.errors import DataError
from liverseg.evaluation.lesions import (
    DETECTION_RULE,
    SIZE_CLASSES,
    lesion_detection,
    pool_detection,
)
from liverseg.evaluation.metrics import (
    class_masks,
    dice_score,
    relative_volume_difference,
    surface_distances,
    volume_overlap_error,
)
from liverseg.geometry import spacing_mm
from liverseg.io import NIFTI_SUFFIXES, atomic_path, list_nifti, natural_key, read_labels
from liverseg.writable import unwritable

log = logging.getLogger(__name__)

PRED_SUFFIXES = ("_seg.nii.gz", "_seg.nii")
LABEL_SUFFIXES = NIFTI_SUFFIXES
# Classes that get VOE, RVD and surface distances (LiTS reports liver and tumor).
SHAPE_CLASSES = {"liver": "liver_incl_tumor", "tumor": "tumor"}
METRIC_COLUMNS = (
    *(f"dice_{name}" for name in DICE_CLASSES),
    *(f"{metric}_{short}" for short in SHAPE_CLASSES for metric in ("voe", "rvd", "assd", "hd95")),
)
DETECTION_COLUMNS = ("true_lesions", "found", "pred_lesions", "true_positive")


@dataclass(frozen=True)
class Evaluation:
    """What ``liverseg evaluate`` computes over a set of cases.

    Attributes:
        rows: Per case, in order: ``case_id``, :data:`METRIC_COLUMNS`, :data:`DETECTION_COLUMNS`.
        detections: Per case, its :func:`~liverseg.evaluation.lesions.lesion_detection` result.
        means: :data:`METRIC_COLUMNS` averaged over the cases that define them (detection
            columns ``""``: detection is pooled, never averaged).
        global_dice: Dice class -> Dice pooled over all voxels of all cases (LiTS's global Dice).
        detection: Lesion detection pooled over all lesions of all cases.
    """

    rows: list[dict]
    detections: list[dict]
    means: dict
    global_dice: dict[str, float]
    detection: dict

    def table(self) -> str:
        """The printable table ``liverseg evaluate`` shows."""
        return _format_table(self.rows, self.means, self.global_dice, self.detection)


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    out_csv: str | Path | None = None,
    min_lesion_mm3: float = 0.0,
    cases: Sequence[str] | None = None,
) -> str:
    """Evaluate every prediction against its truth; optionally write a CSV.

    Args:
        pred_dir: Folder of ``<case>_seg.nii.gz`` predictions.
        gt_dir: Folder of ``<case>.nii.gz`` labels, or a Task03 root holding ``labelsTr/``.
        out_csv: Where to write one row per case plus a ``mean`` row (atomically), or None.
        min_lesion_mm3: Tumor components below this volume are not lesions for detection.
        cases: Evaluate only these case ids (e.g. a run's validation cases); None: all.

    Returns:
        A printable table: per case and mean metrics, NaN counts, global Dice and the pooled
        lesion detection with its rule.

    Raises:
        DataError: A folder is missing or empty, cases do not pair up (all listed), shapes
            differ, or a file holds values other than the labels.
        UnwritableError: ``out_csv`` could not be written (disk full, read-only); the
            computed table is its ``result``, so nothing is lost.
    """
    evaluation = evaluate_pairs(pair_cases(pred_dir, gt_dir, cases), min_lesion_mm3)
    table = evaluation.table()
    if out_csv is not None:
        try:
            _write_csv(out_csv, evaluation.rows, {"case_id": "mean", **evaluation.means})
        except OSError as exc:  # the metrics are computed: hand them back with the error
            raise unwritable(out_csv, exc, "metrics CSV", result=table) from None
    return table


def evaluate_pairs(
    pairs: Mapping[str, tuple[Path, Path]], min_lesion_mm3: float = 0.0
) -> Evaluation:
    """The metrics of ``liverseg evaluate`` over given (prediction, truth) pairs.

    Args:
        pairs: Case id -> (prediction path, truth path), in the order of the rows, e.g. from
            :func:`pair_cases` (or several of its results joined, one per folder).
        min_lesion_mm3: Tumor components below this volume are not lesions for detection.

    Returns:
        Per-case rows, means, global Dice and pooled lesion detection.

    Raises:
        DataError: Shapes differ, or a file holds values other than the labels.
    """
    rows, detections = [], []
    pooled = {name: [0, 0] for name in DICE_CLASSES}  # intersection, |A| + |B|
    for case_id, (pred_path, truth_path) in pairs.items():
        log.info("evaluating %s", case_id)
        row, detection = _evaluate_case(pred_path, truth_path, pooled, min_lesion_mm3)
        rows.append({"case_id": case_id, **row})
        detections.append(detection)
    means = {column: _mean(row[column] for row in rows) for column in METRIC_COLUMNS}
    # Detection counts are pooled, not averaged: they appear under the table, not in the mean row.
    means.update({column: "" for column in DETECTION_COLUMNS})
    global_dice = {
        name: 2 * inter / total if total else math.nan for name, (inter, total) in pooled.items()
    }
    return Evaluation(rows, detections, means, global_dice, pool_detection(detections))


def pair_cases(
    pred_dir: str | Path, gt_dir: str | Path, cases: Sequence[str] | None = None
) -> dict[str, tuple[Path, Path]]:
    """Pair predictions with truths by case id.

    Args:
        pred_dir: Folder of ``<case>_seg.nii.gz`` files.
        gt_dir: Folder of ``<case>.nii.gz`` files, or a Task03 root with ``labelsTr/``.
        cases: Only these case ids, each of which needs a prediction and a truth; the other
            files of both folders are ignored. None: every file must pair up.

    Returns:
        Case id -> (prediction path, truth path), sorted by case id.

    Raises:
        DataError: Listing every case without a truth and every truth without a prediction
            (with ``cases``: every listed case lacking either).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if (gt_dir / "labelsTr").is_dir():
        gt_dir = gt_dir / "labelsTr"
    predictions = _cases(pred_dir, PRED_SUFFIXES, "prediction")
    truths = _cases(gt_dir, LABEL_SUFFIXES, "label")
    if cases is not None:
        wanted = set(cases)
        if not wanted:
            raise DataError("no case ids given to evaluate")
        predictions = {c: p for c, p in predictions.items() if c in wanted}
        truths = {c: t for c, t in truths.items() if c in wanted}
        absent = sorted(wanted - set(predictions) - set(truths), key=natural_key)
        if absent:
            raise DataError(
                f"{len(absent)} requested case(s) have neither a prediction in {pred_dir} nor a "
                f"truth in {gt_dir}: {absent}; check the case ids"
            )
    extra = sorted(set(predictions) - set(truths), key=natural_key)
    missing = sorted(set(truths) - set(predictions), key=natural_key)
    if extra or missing:
        problems = []
        if missing:
            problems.append(f"no prediction in {pred_dir} for {len(missing)} case(s): {missing}")
        if extra:
            problems.append(f"no truth in {gt_dir} for {len(extra)} prediction(s): {extra}")
        raise DataError(
            "predictions and truths do not pair up: "
            + "; ".join(problems)
            + f". Expected <case>_seg.nii.gz in {pred_dir} for every <case>.nii.gz in {gt_dir}; "
            "predict the missing cases or evaluate against a folder holding only these truths"
        )
    return {case: (predictions[case], truths[case]) for case in sorted(truths, key=natural_key)}


def _cases(folder: Path, suffixes: tuple[str, ...], kind: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{kind} folder {folder} does not exist; give a folder of NIfTI files")
    cases = {}
    for path in list_nifti(folder, suffixes):
        suffix = next(s for s in suffixes if path.name.endswith(s))
        case = path.name[: -len(suffix)]
        if case in cases:
            raise DataError(f"case {case} has two {kind} files: {cases[case]} and {path}")
        cases[case] = path
    if not cases:
        raise DataError(f"no {kind} files (*{suffixes[0]}) found in {folder}")
    return cases


def _evaluate_case(
    pred_path: Path, truth_path: Path, pooled: dict, min_lesion_mm3: float
) -> tuple[dict, dict]:
    """Metrics of one case; adds its Dice counts to ``pooled``."""
    pred_labels, pred_affine = read_labels(pred_path)
    truth_labels, truth_affine = read_labels(truth_path)
    if pred_labels.shape != truth_labels.shape:
        raise DataError(
            f"prediction {pred_path} has shape {pred_labels.shape} but truth {truth_path} has "
            f"shape {truth_labels.shape}; predictions must be in the truth's geometry "
            "(liverseg predict writes them so, unless the inputs were prepared/downsampled)"
        )
    if not np.allclose(pred_affine, truth_affine, atol=1e-2):
        log.warning("%s and %s have different affines; comparing voxels", pred_path, truth_path)
    spacing = spacing_mm(truth_affine)
    pred, truth = class_masks(pred_labels), class_masks(truth_labels)
    row = {}
    for name in DICE_CLASSES:
        row[f"dice_{name}"] = dice_score(pred[name], truth[name])
        pooled[name][0] += int(np.logical_and(pred[name], truth[name]).sum())
        pooled[name][1] += int(pred[name].sum()) + int(truth[name].sum())
    for short, name in SHAPE_CLASSES.items():
        row[f"voe_{short}"] = volume_overlap_error(pred[name], truth[name])
        row[f"rvd_{short}"] = relative_volume_difference(pred[name], truth[name])
        row[f"assd_{short}"], row[f"hd95_{short}"] = surface_distances(
            pred[name], truth[name], spacing
        )
    detection = lesion_detection(pred["tumor"], truth["tumor"], truth_affine, min_lesion_mm3)
    row.update({column: detection[column] for column in DETECTION_COLUMNS})
    return row, detection


def _mean(values) -> float:
    """Mean over the cases where the metric is defined.

    NaN (class absent from both prediction and truth) is left out; inf (class absent from
    exactly one, e.g. a tumor entirely missed) is kept, so the mean is inf: a miss is never
    hidden. NaN when no case defines the metric.
    """
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _write_csv(path: str | Path, rows: list[dict], mean_row: dict) -> None:
    columns = ("case_id", *METRIC_COLUMNS, *DETECTION_COLUMNS)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in [*rows, mean_row]:
            writer.writerow({k: _csv_value(row[k]) for k in columns})


def _csv_value(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def _format_table(rows: list[dict], means: dict, global_dice: dict, detection: dict) -> str:
    headers = ("case", *METRIC_COLUMNS)
    body = [[row["case_id"], *(_cell(row[c]) for c in METRIC_COLUMNS)] for row in rows]
    body.append(["mean", *(_cell(means[c]) for c in METRIC_COLUMNS)])
    widths = [max(len(str(line[i])) for line in [headers, *body]) for i in range(len(headers))]
    lines = [
        "  ".join(str(cell).rjust(width) for cell, width in zip(line, widths))
        for line in [headers, *body]
    ]
    lines.insert(len(rows) + 1, "  ".join("-" * width for width in widths))
    lines.append("")
    lines.append(
        "liver = liver incl. tumor; ASSD and HD95 in mm on the truth's voxel size; HD95 = max of "
        "the two directed 95th percentiles"
    )
    lines.append(
        "means leave out NaN = class absent from both prediction and truth (Dice, VOE, ASSD, "
        "HD95) or from the truth (RVD); inf = class absent from exactly one of them (ASSD, "
        "HD95: e.g. a missed tumor) is kept, so one inf case makes the mean inf"
    )
    for column in METRIC_COLUMNS:
        nan = sum(math.isnan(row[column]) for row in rows)
        inf = sum(math.isinf(row[column]) for row in rows)
        if nan or inf:
            lines.append(f"  {column}: {nan} NaN, {inf} inf of {len(rows)} cases")
    lines.append(
        "global Dice (pooled over all voxels of all cases): "
        + ", ".join(f"{name} {_cell(value)}" for name, value in global_dice.items())
    )
    lines.append(f"lesion detection pooled over cases ({DETECTION_RULE}):")
    lines.append(
        f"  recall {_cell(detection['recall'])} ({detection['found']}/"
        f"{detection['true_lesions']} true lesions found), precision "
        f"{_cell(detection['precision'])} ({detection['true_positive']}/"
        f"{detection['pred_lesions']} predicted lesions hit), F1 {_cell(detection['f1'])}"
    )
    lines.append(
        "  recall by longest axial diameter: "
        + ", ".join(
            f"{name} {_cell(detection['by_size'][name]['recall'])} "
            f"({detection['by_size'][name]['found']}/{detection['by_size'][name]['total']})"
            for name in SIZE_CLASSES
        )
    )
    lines.append("RVD = (predicted - true volume) / true volume: positive = over-segmentation")
    return "\n".join(lines)


def _cell(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
