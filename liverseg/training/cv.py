"""k-fold cross-validation, nnU-Net's: every fold trained in turn, then every case scored once.

``liverseg cv`` trains fold K of ``data.folds`` in ``<run.dir>/fold_K`` with
:func:`~liverseg.training.fit.fit`, one fold after another, each predicting its validation cases
at the end (``run.final_predictions``). Then it scores those predictions against their truths as
``liverseg evaluate`` does (:func:`~liverseg.evaluation.folders.evaluate_pairs`), all folds
pooled, into ``<run.dir>/cv_summary.csv``. Each case is validated by exactly one fold
(:mod:`liverseg.data.splits`), so the table scores each case once, by a model that never saw it.

Each fold is an ordinary run folder: an interrupted fold resumes from its ``last.pt``
(``train.resume``), a finished one (``last.pt`` at ``train.epochs`` and a prediction of each of
its validation cases) is skipped. The folds share one preprocessing cache: ``<run.dir>/cache``,
unless ``data.cache_dir`` names another.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from liverseg.config import Config, check_config
from liverseg.constants import DICE_CLASSES
from liverseg.data.splits import folds_path, load_or_create_folds
from liverseg.errors import ConfigError, TrainingError
from liverseg.evaluation.folders import PRED_SUFFIXES, Evaluation, evaluate_pairs, pair_cases
from liverseg.inference.inputs import safe_name
from liverseg.io import atomic_path, remove_stale_temp_files
from liverseg.training import distributed
from liverseg.training.fit import fit
from liverseg.training.preflight import check_run_writable, find_training_cases, resume_state

log = logging.getLogger(__name__)

SUMMARY_NAME = "cv_summary.csv"
# Where each fold's final validation predictions are (liverseg.training.run_folder).
PREDICTIONS_FOLDER = "predictions"
DICE_COLUMNS = tuple(f"dice_{name}" for name in DICE_CLASSES)
SUMMARY_COLUMNS = ("fold", "case_id", *DICE_COLUMNS, "true_lesions", "found", "lesion_recall")


def fold_dir(run_dir: str | Path, fold: int) -> Path:
    """The run folder of fold ``fold``: ``<run_dir>/fold_<fold>``."""
    return Path(run_dir) / f"fold_{fold}"


def fold_config(config: Config, fold: int) -> Config:
    """The config that trains fold ``fold``: its own run folder, the shared cache, predictions on.

    Args:
        config: The cross-validation's config (``run.dir`` holds the folds).
        fold: ``0 <= fold < data.folds``.
    """
    cv_dir = Path(config.run.dir)
    cache_dir = config.data.cache_dir or str(cv_dir / "cache")
    return replace(
        config,
        data=replace(config.data, fold=fold, cache_dir=cache_dir),
        run=replace(config.run, dir=str(fold_dir(cv_dir, fold)), final_predictions=True),
    )


def fold_finished(config: Config, val_cases: Sequence[str]) -> bool:
    """Whether a fold's ``last.pt`` reached ``train.epochs`` and each validation case is predicted.

    Args:
        config: The fold's config (:func:`fold_config`).
        val_cases: The fold's validation case ids.

    Raises:
        TrainingError: The fold's ``last.pt`` was trained with another model/data config
            (:func:`~liverseg.training.preflight.resume_state`).
    """
    run_dir = Path(config.run.dir)
    checkpoint = resume_state(config, run_dir / "checkpoints" / "last.pt")
    if checkpoint is None or checkpoint["epoch"] < config.train.epochs:
        return False
    out = run_dir / PREDICTIONS_FOLDER
    return all((out / f"{safe_name(case)}{PRED_SUFFIXES[0]}").is_file() for case in val_cases)


def cross_validate(config: Config) -> dict:
    """Train every fold of ``data.folds`` in turn, then score all folds' validation predictions.

    Args:
        config: With ``data.folds`` set; ``data.fold`` is ignored (every fold is trained).

    Returns:
        ``{"trained": folds trained (or resumed) by this call, "skipped": folds already
        finished, "summary": the cv_summary.csv path, "table": the printable table}``.

    Raises:
        ConfigError: ``data.folds`` is not set.
        DataError: The dataset, or its splits file (:mod:`liverseg.data.splits`), is refused.
        TrainingError: Started by torchrun, which ``liverseg cv`` does not support yet.
    """
    check_config(config)
    if distributed.launched():
        raise TrainingError(
            "liverseg cv does not run under torchrun yet: train each fold with `torchrun ... "
            "main.py data.folds=K data.fold=F run.dir=<dir>/fold_F run.final_predictions=true`, "
            "then run `liverseg cv` without torchrun to score them (finished folds are skipped)"
        )
    data = config.data
    if data.folds is None:
        raise ConfigError(
            "liverseg cv needs data.folds, the number of folds (nnU-Net uses 5): add data.folds=5"
        )
    check_run_writable(config)
    remove_stale_temp_files([Path(config.run.dir)])  # a cv_summary.csv write that was killed
    case_ids = [case.case_id for case in find_training_cases(config)]
    shared = folds_path(data.root, data.folds, data.split_seed)
    splits = load_or_create_folds(shared, case_ids, data.folds, data.split_seed)
    trained, skipped = [], []
    for fold, split in enumerate(splits):
        fold_run = fold_config(config, fold)
        if fold_finished(fold_run, split["val"]):
            log.info("fold %d of %d is finished in %s: skipped", fold, data.folds, fold_run.run.dir)
            skipped.append(fold)
            continue
        log.info("fold %d of %d: training in %s", fold, data.folds, fold_run.run.dir)
        fit(fold_run)
        trained.append(fold)
    evaluation, fold_of = evaluate_folds(config.run.dir, data.root, splits)
    rows = summary_rows(evaluation, fold_of)
    summary = Path(config.run.dir) / SUMMARY_NAME
    write_summary(summary, rows)
    log.info("cross-validation of %d folds: %s", data.folds, summary)
    return {
        "trained": trained,
        "skipped": skipped,
        "summary": summary,
        "table": format_summary(rows),
    }


def evaluate_folds(
    run_dir: str | Path, root: str | Path, splits: Sequence[dict[str, list[str]]]
) -> tuple[Evaluation, dict[str, int]]:
    """Score each fold's validation predictions against the truths, all folds pooled.

    Args:
        run_dir: The cross-validation's folder, holding ``fold_K/predictions/``.
        root: ``data.root``, whose ``labelsTr/`` holds the truths.
        splits: The folds (:func:`~liverseg.data.splits.load_or_create_folds`).

    Returns:
        ``liverseg evaluate``'s metrics over every validation case, fold by fold, and the fold
        that validated each case.

    Raises:
        DataError: A validation case has no prediction or no truth.
    """
    pairs, fold_of = {}, {}
    for fold, split in enumerate(splits):
        predictions = fold_dir(run_dir, fold) / PREDICTIONS_FOLDER
        found = pair_cases(predictions, root, split["val"])
        pairs.update(found)
        fold_of.update(dict.fromkeys(found, fold))
    return evaluate_pairs(pairs), fold_of


def summary_rows(evaluation: Evaluation, fold_of: dict[str, int]) -> list[dict]:
    """The rows of ``cv_summary.csv``: one per case, then ``mean`` and ``global``.

    ``mean`` averages each Dice over the cases that define it, as ``liverseg evaluate``'s mean
    row (lesion columns empty: detection is pooled, never averaged); ``global`` is Dice pooled
    over all voxels and lesion detection pooled over all lesions of all cases.
    """
    rows = [
        {
            "fold": fold_of[row["case_id"]],
            "case_id": row["case_id"],
            **{column: row[column] for column in DICE_COLUMNS},
            "true_lesions": row["true_lesions"],
            "found": row["found"],
            "lesion_recall": detection["recall"],
        }
        for row, detection in zip(evaluation.rows, evaluation.detections, strict=True)
    ]
    mean = {column: evaluation.means[column] for column in DICE_COLUMNS}
    lesions = {"true_lesions": "", "found": "", "lesion_recall": ""}
    rows.append({"fold": "all", "case_id": "mean", **mean, **lesions})
    pooled = evaluation.detection
    rows.append(
        {
            "fold": "all",
            "case_id": "global",
            **{f"dice_{name}": evaluation.global_dice[name] for name in DICE_CLASSES},
            "true_lesions": pooled["true_lesions"],
            "found": pooled["found"],
            "lesion_recall": pooled["recall"],
        }
    )
    return rows


def write_summary(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (:func:`summary_rows`) as ``cv_summary.csv``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def format_summary(rows: list[dict]) -> str:
    """The printable cross-validation table of ``rows`` (:func:`summary_rows`)."""
    body = [[_cell(row[column]) for column in SUMMARY_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [SUMMARY_COLUMNS, *body]) for i in range(len(body[0]))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [SUMMARY_COLUMNS, *body]
    ]
    lines.insert(len(rows) - 1, "  ".join("-" * width for width in widths))
    lines.append("")
    lines.append(
        "mean: over the cases where a Dice is defined (NaN = class absent from both prediction "
        "and truth); global: Dice pooled over all voxels, lesion recall over all lesions, of "
        "every fold's validation cases; each case validated by the one fold that did not train "
        "on it"
    )
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}"
    return str(value)
