"""``liverseg predict``: segment CT files or folders with a checkpoint and write a report per case.

For each input case ``<id>`` the output folder receives ``<id>_seg.nii.gz`` (uint8 labels in the
input's shape and affine), ``<id>_report.json`` (:func:`liverseg.evaluation.report.case_report`,
with the input's HU, the lesions' confidences, the checkpoints that made it and a ``qc`` block,
:func:`liverseg.evaluation.qc.case_qc`) and a row of ``summary.csv`` (its ``qc`` column: ``ok``
or ``review: <reasons>``). Several
checkpoints make an ensemble whose probabilities are averaged
(:func:`liverseg.checkpoints.load_models`). Everything is written to a temporary name
first, then renamed. One bad input is reported and skipped; the others are still processed.

The inputs get the data doctor's CT value checks (:mod:`liverseg.data.intensities`): NaN/Inf or
int8 voxels fail that input (``status`` ``failed: ...``, exit 1); implausible HU (a constant
volume, no air, no tissue: MR or normalised data) are predicted but warned, first in the
report's ``warnings`` and in the ``warnings`` column of ``summary.csv`` (all the report's
warnings, joined by ``" | "``; ``status`` stays ``ok``, so it keeps one meaning per value).

A DICOM folder (:mod:`liverseg.io.dicom`) is one case named after the folder, never after its
``PatientID`` or ``SeriesDescription``: output names and ``summary.csv`` then carry no patient
identifier, and two series of one patient do not collide. Its outputs are NIfTI in the geometry
of the series read.

Inputs in the ``imagesTr``/``imagesTs`` folder of a root holding ``prepare.json`` were written by
``liverseg prepare`` and are already reduced: they are predicted at their own resolution
whether or not ``prepared`` is passed, so they are never reduced twice.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import torch

from liverseg.checkpoints import load_models
from liverseg.data.prepare import RECORD_NAME, load_prepare_record
from liverseg.evaluation.qc import QcThresholds, case_qc, summary_text
from liverseg.evaluation.report import case_report
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.volume import predict_volume
from liverseg.io import (
    atomic_path,
    case_id_of,
    list_dicom,
    list_nifti,
    natural_key,
    read_volume,
    save_nifti,
)

log = logging.getLogger(__name__)

# Folders of a Task03 root searched for inputs, in order.
TASK03_IMAGE_FOLDERS = ("imagesTs", "imagesTr")
SUMMARY_NAME = "summary.csv"
# ``qc``: the report's quality control, ``ok`` or ``review: reason; reason``
# (:func:`liverseg.evaluation.qc.summary_text`).
# ``checkpoints``: the checkpoint files that made the row, joined by " | " (several: an
# ensemble). ``warnings``: the report's warnings joined by " | " (empty when there are none);
# last, so the columns before it keep their places and a long warning does not push them apart.
SUMMARY_COLUMNS = (
    "case_id",
    "liver_ml",
    "tumor_ml",
    "lesions",
    "seconds",
    "status",
    "qc",
    "input",
    "checkpoints",
    "warnings",
)
WARNING_SEPARATOR = " | "

Failure = tuple[Path, str]


def safe_name(case_id: str) -> str:
    """A file-name stem from a case id: only ``[A-Za-z0-9._-]``, no leading dot, never empty.

    Path separators and other characters become ``_``, so outputs stay inside the output folder.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)
    if name.startswith("."):
        name = "_" + name[1:]
    return name or "case"


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[Failure]]:
    """The NIfTI files and DICOM series folders named by ``inputs``.

    A file is taken as is. A folder gives its ``.nii``/``.nii.gz`` files (names starting with
    ``"."`` ignored); a Task03 root gives those of its ``imagesTs``, else its ``imagesTr``. A
    folder without NIfTI files that holds DICOM files (``DICM`` at byte 128, any file name) is
    one input: its CT series (:func:`liverseg.io.dicom.read_dicom_series`), named by the folder.

    Returns:
        ``(inputs, failures)``: failures name inputs that do not exist or hold no NIfTI or
        DICOM file.
    """
    files: list[Path] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
            continue
        if not path.is_dir():
            failures.append((path, "not found; expected a .nii/.nii.gz file or a folder"))
            continue
        folder = next(
            (
                path / sub
                for sub in TASK03_IMAGE_FOLDERS
                if (path / sub).is_dir() and list_nifti(path / sub)
            ),
            path,
        )
        found = list_nifti(folder)
        if not found and list_dicom(path, first_only=True):
            found = [path]
        if not found:
            failures.append(
                (path, "folder holds no .nii/.nii.gz or DICOM file (nor imagesTs/, imagesTr/)")
            )
        files.extend(found)
    return files, failures


def predict_paths(
    checkpoint: str | Path | Sequence[str | Path],
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    prepared: bool = False,
    device: str | torch.device = "auto",
    tta_flips: int | None = None,
    skip_air_windows: bool | None = None,
    series_uid: str | None = None,
    qc: QcThresholds | None = None,
) -> list[Failure]:
    """Segment every input and write segmentations, reports and ``summary.csv`` to ``out_dir``.

    Args:
        checkpoint: A checkpoint of ``liverseg train``, or several (an ensemble, e.g. the folds
            of a cross-validation: their probabilities are averaged per window); models and
            preprocessing come from them, the sliding window's settings from the first.
        inputs: NIfTI CT files (HU), folders of them, Task03 roots, or DICOM series folders
            (see :func:`collect_inputs`).
        out_dir: Output folder (created). Temp files that a killed run left there more than an
            hour ago are removed.
        overwrite: Replace a case's existing outputs; otherwise that case is a failure.
        prepared: The inputs were reduced by ``liverseg prepare`` (predict at their resolution);
            otherwise they are originals, reduced by the checkpoint's factor and mapped back.
            Inputs inside a folder written by ``liverseg prepare`` (see :func:`prepare_record_of`)
            are predicted at their resolution either way, and a log line says so.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        tta_flips: Test-time mirroring passes (1, 2, 4 or 8); None: the checkpoint's
            ``inference.tta_flips``.
        skip_air_windows: Whether windows of nothing but air are skipped; None: the
            checkpoint's ``inference.skip_air_windows``.
        series_uid: The ``SeriesInstanceUID`` read from each DICOM folder (a folder without
            it fails); None: each folder's CT series with the most slices.
        qc: When each report's quality control (``qc`` block, ``qc`` column) asks for review
            (:class:`liverseg.evaluation.qc.QcThresholds`); None: the defaults.

    Returns:
        ``(input path, message)`` per input that failed; empty when all succeeded.

    Raises:
        CheckpointError: A checkpoint cannot be used, or the checkpoints of an ensemble
            disagree on their input or output (nothing is predicted).
    """
    from tqdm import tqdm

    from liverseg.io import SHARED_TEMP_MIN_AGE_S, remove_stale_temp_files

    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    models, settings = load_models(checkpoints, device)
    if tta_flips is not None:
        settings = settings.replace(tta_flips=tta_flips)
    if skip_air_windows is not None:
        settings = settings.replace(skip_air_windows=skip_air_windows)
    used = WARNING_SEPARATOR.join(str(c) for c in checkpoints)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Temp files of a killed earlier run; another predict may be writing to the same folder now.
    remove_stale_temp_files([out_dir], min_age_s=SHARED_TEMP_MIN_AGE_S)
    files, failures = collect_inputs(inputs)
    summary_path = out_dir / SUMMARY_NAME
    rows = _read_summary(summary_path)
    claimed: dict[str, Path] = {}
    for path in tqdm(files, desc="predict", unit="case"):
        name = safe_name(case_id_of(path))
        if name in claimed:
            failures.append(
                (path, f"its output name {name!r} is taken by {claimed[name]}; rename one of them")
            )
            continue
        claimed[name] = path
        outputs = (out_dir / f"{name}_seg.nii.gz", out_dir / f"{name}_report.json")
        existing = [p for p in outputs if p.exists()]
        if existing and not overwrite:
            failures.append((path, f"{existing[0]} exists; pass --overwrite to replace it"))
            rows.setdefault(name, _row(name, path, status="skipped: output exists"))
            continue
        start = time.perf_counter()
        try:
            # A target-spacing model resamples every input (a no-op for one already at it).
            reduced = prepared or (
                settings.spacing_mm is None and _already_reduced(path, settings.factor)
            )
            report = predict_case(
                models, path, name, outputs, settings, reduced, series_uid, qc
            )
        except Exception as exc:  # one bad case must not stop the others
            log.debug("prediction of %s failed", path, exc_info=True)
            message = str(exc).splitlines()[0] if str(exc) else ""
            message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
            failures.append((path, message))
            rows[name] = _row(name, path, status=f"failed: {message}", checkpoints=used)
        else:
            rows[name] = _row(
                name,
                path,
                liver_ml=f"{report['liver_volume_ml']:.3f}",
                tumor_ml=f"{report['tumor_burden_ml']:.3f}",
                lesions=report["lesion_count"],
                seconds=f"{time.perf_counter() - start:.2f}",
                status="ok",
                qc=summary_text(report["qc"]),
                checkpoints=used,
                warnings=WARNING_SEPARATOR.join(report["warnings"]),
            )
        _write_summary(summary_path, rows)
    return failures


def prepare_record_of(path: str | Path) -> Path | None:
    """The ``prepare.json`` of the ``liverseg prepare`` output holding ``path``, or None.

    That is ``<root>/prepare.json`` for ``path`` = ``<root>/imagesTr/<file>`` or
    ``<root>/imagesTs/<file>``.
    """
    folder = Path(path).parent
    if folder.name not in TASK03_IMAGE_FOLDERS:
        return None
    record = folder.parent / RECORD_NAME
    return record if record.is_file() else None


def _already_reduced(path: Path, checkpoint_factor: int) -> bool:
    """Whether ``path`` was written by ``liverseg prepare`` (then it is predicted as it is).

    Raises:
        DataError: The folder's ``prepare.json`` cannot be read.
    """
    record_path = prepare_record_of(path)
    if record_path is None:
        return False
    factor = load_prepare_record(record_path.parent)["factor"]
    log.info(
        "%s lies in a folder written by `liverseg prepare` (%s, factor %s): predicting it at "
        "its own resolution, not reducing it again",
        path,
        record_path,
        factor,
    )
    if factor != checkpoint_factor:
        log.warning(
            "%s was reduced by factor %s but the checkpoint was trained on data reduced by %s; "
            "predict the original scan instead",
            path,
            factor,
            checkpoint_factor,
        )
    return True


def predict_case(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    path: Path,
    case_id: str,
    outputs: tuple[Path, Path],
    settings: InferenceSettings,
    prepared: bool = False,
    series_uid: str | None = None,
    qc: QcThresholds | None = None,
) -> dict:
    """Predict one CT file or DICOM folder and write its segmentation and report; return it.

    Args:
        model: The network, on its device, or the networks of an ensemble.
        path: The CT (HU): a NIfTI file or a DICOM series folder.
        case_id: Name used in the report.
        outputs: ``(segmentation path, report path)``.
        settings: How to predict; ``settings.min_lesion_mm3`` is the smallest lesion the report
            counts and ``settings.provenance`` (which checkpoint or checkpoints) is stored as
            its ``model``.
        prepared: ``path`` was already reduced by ``liverseg prepare``.
        series_uid: For a DICOM folder, the series to read (None: the CT series with the most
            slices).
        qc: When the report's quality control asks for review (None: the defaults).

    Raises:
        DataError: ``path`` cannot be read or segmented (NaN/Inf or int8 voxels); implausible
            HU (a constant volume, no air or no tissue) go into the report's ``warnings``.
    """
    hu, affine = read_volume(path, series_uid=series_uid)
    image = nib.Nifti1Image(hu, affine)
    image.set_filename(str(path))  # only so that predict_volume's log lines name the file
    prediction = predict_volume(
        model, image, settings, prepared=prepared, progress=True, keep_regions=True
    )
    report = case_report(
        prediction.labels,
        affine,
        image_hu=hu,
        min_tumor_mm3=settings.min_lesion_mm3,
        case_id=case_id,
        regions=prediction.regions,
    )
    report["qc"] = case_qc(
        prediction.labels,
        affine,
        prediction.regions,
        prediction.warnings,
        qc or QcThresholds(),
        report["lesions"],
    )
    report["warnings"] = [*prediction.warnings, *report["warnings"]]
    report["input"] = str(path)
    if settings.provenance is not None:
        report["model"] = dict(settings.provenance)
    seg_path, report_path = outputs
    save_nifti(prediction.labels, affine, seg_path)
    with atomic_path(report_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


def _row(case_id: str, path: Path, **values) -> dict:
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(case_id=case_id, input=str(path), **values)
    return row


def _read_summary(path: Path) -> dict[str, dict]:
    """Rows of an earlier run's summary by case id, so a second run adds to it."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {
            row["case_id"]: {c: row.get(c) or "" for c in SUMMARY_COLUMNS}
            for row in csv.DictReader(f)
            if row.get("case_id")
        }


def _write_summary(path: Path, rows: dict[str, dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[key] for key in sorted(rows, key=natural_key))
