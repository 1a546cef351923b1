"""One share of ``liverseg predict``'s cases, predicted by one process, and each case's outputs.

:func:`predict_share` is what every process of a run does with its share (all the cases in one
process, a worker's or a rank's share otherwise): the checkpoints loaded once
(:func:`load_job_models`), each case predicted by :func:`predict_case`, its row of the summary
written after each case. A case that cannot be predicted is a failure of its own
(``status`` ``failed: ...``); the others still run.

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

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import torch

from liverseg.checkpoints import load_models
from liverseg.data.prepare import RECORD_NAME, load_prepare_record
from liverseg.errors import DataError, LiversegError
from liverseg.evaluation.qc import QcThresholds, case_qc, summary_text
from liverseg.evaluation.report import case_report
from liverseg.inference.inputs import TASK03_IMAGE_FOLDERS, Failure
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.summary import WARNING_SEPARATOR, summary_row, write_summary
from liverseg.inference.volume import predict_volume
from liverseg.inference.workers import Report
from liverseg.io import atomic_path, read_volume, save_nifti

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictJob:
    """What predicting a share of the cases needs, whichever process does it (picklable).

    Attributes:
        checkpoints: The checkpoint files (several: an ensemble).
        out_dir: The output folder.
        prepared: The inputs were reduced by ``liverseg prepare``.
        tta_flips: Mirrored passes; None: the checkpoint's.
        skip_air_windows: Skip the air around the body (windows over the body's box, windows of
            nothing but air not run) or run every window of the whole volume; None: the
            checkpoint's ``skip_air_windows`` and ``crop_to_body``.
        series_uid: The series to read from DICOM folders; None: the CT series with most slices.
        qc: When the quality control asks for review; None: the defaults.
        progress: A progress bar over each volume's windows (in one process only).
        output_format: ``"nifti"`` (``<id>_seg.nii.gz``), ``"dicom-seg"`` (``<id>_seg.dcm``, a
            DICOM Segmentation over the input series: DICOM inputs only) or ``"both"``.
    """

    checkpoints: tuple[Path, ...]
    out_dir: Path
    prepared: bool = False
    tta_flips: int | None = None
    skip_air_windows: bool | None = None
    series_uid: str | None = None
    qc: QcThresholds | None = None
    progress: bool = True
    output_format: str = "nifti"

    @property
    def used(self) -> str:
        """The ``checkpoints`` column: the files, joined by ``" | "``."""
        return WARNING_SEPARATOR.join(str(c) for c in self.checkpoints)


@dataclass(frozen=True)
class PlannedCase:
    """An input to predict.

    Attributes:
        index: Its place in the listing: orders the failures, whichever process predicted it.
        path: The NIfTI file or DICOM folder.
        name: :func:`liverseg.inference.inputs.safe_name` of its case id: its output names and
            its row of the summary.
    """

    index: int
    path: Path
    name: str


OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")


def case_outputs(out_dir: Path, name: str) -> tuple[Path, Path, Path]:
    """``(NIfTI segmentation, report, DICOM-SEG)`` paths of case ``name`` in ``out_dir``."""
    return (
        out_dir / f"{name}_seg.nii.gz",
        out_dir / f"{name}_report.json",
        out_dir / f"{name}_seg.dcm",
    )


def load_job_models(
    job: PredictJob, device: str | torch.device
) -> tuple[list[torch.nn.Module], InferenceSettings]:
    """The job's models on ``device`` and their settings, with its TTA and air overrides.

    Raises:
        CheckpointError: A checkpoint cannot be used, or those of an ensemble disagree.
    """
    models, settings = load_models(job.checkpoints, device)
    if job.tta_flips is not None:
        settings = settings.replace(tta_flips=job.tta_flips)
    if job.skip_air_windows is not None:
        air = job.skip_air_windows
        settings = settings.replace(skip_air_windows=air, crop_to_body=air)
    return models, settings


def predict_share(
    cases: Sequence[PlannedCase],
    job: PredictJob,
    models: list[torch.nn.Module],
    settings: InferenceSettings,
    worker: str,
    rows: dict[str, dict],
    summary_path: Path,
    report: Report,
) -> list[tuple[int, Failure]]:
    """Predict ``cases``, rewriting ``summary_path`` with ``rows`` after each.

    Args:
        cases: This process's share.
        job: What to predict with, and where to write.
        models: The job's models (:func:`load_job_models`), on this process's device.
        settings: Their settings.
        worker: The ``worker`` column: ``<index>/<device>``.
        rows: The rows ``summary_path`` holds besides this share's (all of ``summary.csv``'s in
            one process; none in a worker's part file); each case's row is added.
        summary_path: ``summary.csv``, or the worker's part file.
        report: Told of each case started and finished.

    Returns:
        ``(index, (input path, message))`` per case that failed.
    """
    failures = []
    for case in cases:
        report("start", case.name)
        rows[case.name], failure = _predict_one(case, job, models, settings, worker)
        write_summary(summary_path, rows)
        if failure is not None:
            failures.append((case.index, failure))
        report("done", case.name)
    return failures


def _predict_one(
    case: PlannedCase, job: PredictJob, models, settings: InferenceSettings, worker: str
) -> tuple[dict, Failure | None]:
    """Predict one case; its summary row, and its failure if it failed."""
    start = time.perf_counter()
    try:
        # A target-spacing model resamples every input (a no-op for one already at it).
        reduced = job.prepared or (
            settings.spacing_mm is None and _already_reduced(case.path, settings.factor)
        )
        outputs = case_outputs(job.out_dir, case.name)
        report = predict_case(
            models, case.path, case.name, outputs, settings, reduced, job.series_uid, job.qc,
            progress=job.progress, output_format=job.output_format,
        )  # fmt: skip
    except Exception as exc:  # one bad case must not stop the others
        log.debug("prediction of %s failed", case.path, exc_info=True)
        message = str(exc).splitlines()[0] if str(exc) else ""
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        row = summary_row(
            case.name, case.path, worker=worker, status=f"failed: {message}", checkpoints=job.used
        )
        return row, (case.path, message)
    row = summary_row(
        case.name,
        case.path,
        liver_ml=f"{report['liver_volume_ml']:.3f}",
        tumor_ml=f"{report['tumor_burden_ml']:.3f}",
        lesions=report["lesion_count"],
        seconds=f"{time.perf_counter() - start:.2f}",
        worker=worker,
        status="ok",
        qc=summary_text(report["qc"]),
        checkpoints=job.used,
        warnings=WARNING_SEPARATOR.join(report["warnings"]),
    )
    return row, None


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
    outputs: tuple[Path, Path, Path],
    settings: InferenceSettings,
    prepared: bool = False,
    series_uid: str | None = None,
    qc: QcThresholds | None = None,
    *,
    progress: bool = True,
    output_format: str = "nifti",
) -> dict:
    """Predict one CT file or DICOM folder and write its segmentation and report; return it.

    Args:
        model: The network, on its device, or the networks of an ensemble.
        path: The CT (HU): a NIfTI file or a DICOM series folder.
        case_id: Name used in the report.
        outputs: ``(NIfTI segmentation path, report path, DICOM-SEG path)``
            (:func:`case_outputs`).
        settings: How to predict; ``settings.min_lesion_mm3`` is the smallest lesion the report
            counts and ``settings.provenance`` (which checkpoint or checkpoints) is stored as
            its ``model``.
        prepared: ``path`` was already reduced by ``liverseg prepare``.
        series_uid: For a DICOM folder, the series to read (None: the CT series with the most
            slices).
        qc: When the report's quality control asks for review (None: the defaults).
        progress: Show a progress bar over the volume's windows.
        output_format: ``"nifti"``, ``"dicom-seg"`` or ``"both"`` (:class:`PredictJob`).

    Raises:
        DataError: ``path`` cannot be read or segmented (NaN/Inf or int8 voxels), or a DICOM-SEG
            is asked of a NIfTI input; implausible HU (a constant volume, no air or no tissue)
            go into the report's ``warnings``.
    """
    if output_format not in OUTPUT_FORMATS:
        raise LiversegError(
            f"output format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}"
        )
    if output_format != "nifti" and not Path(path).is_dir():
        raise DataError(
            f"{path}: a DICOM-SEG references the instances of a DICOM series, and this input "
            "is a file, not a series folder; use --format nifti for NIfTI inputs"
        )
    hu, affine = read_volume(path, series_uid=series_uid)
    image = nib.Nifti1Image(hu, affine)
    image.set_filename(str(path))  # only so that predict_volume's log lines name the file
    prediction = predict_volume(
        model, image, settings, prepared=prepared, progress=progress, keep_regions=True
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
        settings.min_lesion_mm3,
    )
    report["warnings"] = [*prediction.warnings, *report["warnings"]]
    report["input"] = str(path)
    if settings.provenance is not None:
        report["model"] = dict(settings.provenance)
    seg_path, report_path, dicom_seg = outputs
    if output_format in ("nifti", "both"):
        save_nifti(prediction.labels, affine, seg_path)
    if output_format in ("dicom-seg", "both"):
        from liverseg.io.dicom_seg import write_dicom_seg  # highdicom: the `dicom` extra

        write_dicom_seg(prediction.labels, path, dicom_seg, series_uid=series_uid,
                        provenance=settings.provenance)  # fmt: skip
        report["dicom_seg"] = str(dicom_seg)
    with atomic_path(report_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report
