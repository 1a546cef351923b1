"""``liverseg predict`` over many inputs: plan the run, share the cases, merge the summary.

For each input case ``<id>`` the output folder receives ``<id>_seg.nii.gz`` (uint8 labels in the
input's shape and affine), ``<id>_report.json`` (:func:`liverseg.evaluation.report.case_report`,
with the input's HU, the lesions' confidences, the checkpoints that made it and a ``qc`` block,
:func:`liverseg.evaluation.qc.case_qc`) and a row of ``summary.csv``
(:mod:`liverseg.inference.summary`; its ``qc`` column: ``ok`` or ``review: <reasons>``). Several
checkpoints make an ensemble whose probabilities are averaged
(:func:`liverseg.checkpoints.load_models`). Everything is written to a temporary name first, then
renamed. One bad input is reported and skipped; the others are still processed. Which inputs, and
their output names: :mod:`liverseg.inference.inputs`; what each case goes through:
:mod:`liverseg.inference.share`.

One process plans the run before anything is written: it removes stale temp files, merges the
summary parts a killed run left, lists the inputs and refuses those whose outputs exist. The cases
are then predicted in this process (``workers=1``), by spawned workers
(:mod:`liverseg.inference.workers`) or by torchrun's ranks (:mod:`liverseg.inference.ranks`):
each worker writes its cases' outputs and its own summary part, and the planning process merges
the parts into ``summary.csv`` once every worker is done.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from liverseg.errors import LiversegError, WorkerError
from liverseg.evaluation.qc import QcThresholds
from liverseg.inference.inputs import Failure, collect_inputs, input_bytes, safe_name
from liverseg.inference.ranks import from_rank0, gather_ranks, join_ranks, leave_ranks
from liverseg.inference.share import (
    PlannedCase,
    PredictJob,
    case_outputs,
    load_job_models,
    predict_share,
)
from liverseg.inference.summary import (
    SUMMARY_NAME,
    merge_summary_parts,
    part_path,
    summary_row,
    write_summary,
)
from liverseg.inference.workers import (
    Report,
    Worker,
    run_workers,
    split_shares,
    worker_devices,
    worker_threads,
)
from liverseg.io import case_id_of
from liverseg.torchrun import launched

log = logging.getLogger(__name__)


@dataclass
class _Plan:
    """What one run does, decided before anything is predicted."""

    cases: list[PlannedCase] = field(default_factory=list)  # to predict, in listing order
    rows: dict[str, dict] = field(default_factory=dict)  # summary.csv's, once planned
    unlisted: list[Failure] = field(default_factory=list)  # inputs not found or empty
    refused: list[tuple[int, Failure]] = field(default_factory=list)  # name taken, output exists

    def failures(self, predicted: Sequence[tuple[int, Failure]]) -> list[Failure]:
        """Every failure of the run: the listing's, then by input in listing order."""
        ordered = sorted([*self.refused, *predicted], key=lambda item: item[0])
        return [*self.unlisted, *(failure for _, failure in ordered)]


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
    workers: int = 1,
    output_format: str = "nifti",
) -> list[Failure]:
    """Segment every input and write segmentations, reports and ``summary.csv`` to ``out_dir``.

    Args:
        checkpoint: A checkpoint of ``liverseg train``, or several (an ensemble, e.g. the folds
            of a cross-validation: their probabilities are averaged per window); models and
            preprocessing come from them, the sliding window's settings from the first.
        inputs: NIfTI CT files (HU), folders of them, Task03 roots, or DICOM series folders
            (see :func:`liverseg.inference.inputs.collect_inputs`).
        out_dir: Output folder (created). Temp files that a killed run left there more than an
            hour ago are removed, and summary parts it left are merged into ``summary.csv``.
        overwrite: Replace a case's existing outputs; otherwise that case is a failure.
        prepared: The inputs were reduced by ``liverseg prepare`` (predict at their resolution);
            otherwise they are originals, reduced by the checkpoint's factor and mapped back.
            Inputs inside a folder written by ``liverseg prepare``
            (:func:`liverseg.inference.share.prepare_record_of`) are predicted at their
            resolution either way, and a log line says so.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ... With several workers, ``auto`` and
            ``cuda`` deal them round-robin over the GPUs; under torchrun each rank takes GPU
            ``LOCAL_RANK`` (``auto``, ``cuda``) or the CPU (``cpu``).
        tta_flips: Test-time mirroring passes (1, 2, 4 or 8); None: the checkpoint's
            ``inference.tta_flips``.
        skip_air_windows: True: skip the air around the body (windows over the body's box,
            windows of nothing but air not run); False: run every window of the whole volume;
            None: the checkpoint's ``inference.skip_air_windows`` and ``crop_to_body``.
        series_uid: The ``SeriesInstanceUID`` read from each DICOM folder (a folder without
            it fails); None: each folder's CT series with the most slices.
        qc: When each report's quality control (``qc`` block, ``qc`` column) asks for review
            (:class:`liverseg.evaluation.qc.QcThresholds`); None: the defaults.
        workers: Processes that share the cases (:mod:`liverseg.inference.workers`); 1 predicts
            in this process. They are spawned: a script calling this needs
            ``if __name__ == "__main__":``. Under torchrun (``WORLD_SIZE`` set, no process group
            yet) each rank predicts its share instead, and ``workers`` must be 1.
        output_format: ``"nifti"`` (``<id>_seg.nii.gz``), ``"dicom-seg"`` (``<id>_seg.dcm``: a
            DICOM Segmentation referencing the input series, :mod:`liverseg.io.dicom_seg`; a
            NIfTI input then fails) or ``"both"``.

    Returns:
        ``(input path, message)`` per input that failed; empty when all succeeded. Under
        torchrun rank 0 returns every rank's failures, the other ranks an empty list.

    Raises:
        CheckpointError: A checkpoint cannot be used, or the checkpoints of an ensemble
            disagree on their input or output (nothing is predicted).
        WorkerError: A worker died or stopped outside its cases (after the others finished).
        LiversegError: ``workers`` < 1, or > 1 under torchrun.
    """
    if workers < 1:
        raise LiversegError(f"--workers: expected an integer >= 1, found {workers}")
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    job = PredictJob(
        tuple(Path(c) for c in checkpoints),
        Path(out_dir),
        prepared,
        tta_flips,
        skip_air_windows,
        series_uid,
        qc,
        output_format=output_format,
    )
    if launched() and not _in_process_group():
        if workers > 1:
            raise LiversegError(
                f"--workers {workers} under torchrun: each rank already predicts its share of "
                "the cases; drop --workers, or run without torchrun"
            )
        return _predict_on_ranks(job, inputs, overwrite, str(device))
    if workers > 1:
        return _predict_in_workers(job, inputs, overwrite, str(device), workers)
    return _predict_here(job, inputs, overwrite, device)


def _in_process_group() -> bool:
    """Whether a caller joined a process group already (training's rank 0 predicting alone)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _predict_here(job: PredictJob, inputs, overwrite: bool, device) -> list[Failure]:
    """Every case in this process, ``summary.csv`` rewritten after each (as one worker)."""
    from tqdm import tqdm

    # A bad checkpoint stops the run before the output folder is touched.
    models, settings = load_job_models(job, device)
    plan = _plan(job.out_dir, inputs, overwrite)
    label = Worker(0, 1, str(next(models[0].parameters()).device)).label
    summary_path = job.out_dir / SUMMARY_NAME
    with tqdm(total=len(plan.cases), desc="predict", unit="case") as bar:
        report = _progress(bar)
        predicted = predict_share(
            plan.cases, job, models, settings, label, plan.rows, summary_path, report
        )
    return plan.failures(predicted)


def _predict_in_workers(
    job: PredictJob, inputs, overwrite: bool, device: str, workers: int
) -> list[Failure]:
    """The cases split between ``workers`` spawned processes; their parts merged at the end."""
    devices = worker_devices(device, workers)
    plan = _plan(job.out_dir, inputs, overwrite)
    shares = _shares(plan.cases, min(workers, len(plan.cases)))
    if not shares:
        return plan.failures([])
    try:
        results = run_workers(
            _predict_worker_share,
            shares,
            dataclasses.replace(job, progress=False),
            devices[: len(shares)],
            worker_threads(len(shares)),
        )
    except WorkerError as error:  # the failures of the workers that finished, for the CLI
        error.failures = plan.failures([f for result in error.results if result for f in result])
        raise
    finally:  # what the workers finished, even when one of them died
        merge_summary_parts(job.out_dir)
    return plan.failures([failure for result in results for failure in result])


def _predict_worker_share(
    worker: Worker, cases: list[PlannedCase], job: PredictJob, report: Report
) -> list[tuple[int, Failure]]:
    """One worker's share (in its own process): load the checkpoints once, predict, write a part."""
    models, settings = load_job_models(job, worker.device)
    part = part_path(job.out_dir, worker.index)
    return predict_share(cases, job, models, settings, worker.label, {}, part, report)


def _predict_on_ranks(job: PredictJob, inputs, overwrite: bool, device: str) -> list[Failure]:
    """This rank's share under torchrun; rank 0 plans, then merges every rank's part."""
    from tqdm import tqdm

    worker = join_ranks(device)
    try:
        models, settings = load_job_models(job, worker.device)
        plan, shares = from_rank0(lambda: _plan_shares(job.out_dir, inputs, overwrite, worker))
        share = shares[worker.index]
        part = part_path(job.out_dir, worker.index)
        job = dataclasses.replace(job, progress=False)
        with tqdm(
            total=len(share), desc="predict (rank 0)", unit="case", disable=worker.index != 0
        ) as bar:
            predicted = predict_share(
                share, job, models, settings, worker.label, {}, part, _progress(bar)
            )
        everyone = gather_ranks(predicted)
        if worker.index != 0:
            return []
        merge_summary_parts(job.out_dir)
        return plan.failures([failure for failures in everyone for failure in failures])
    finally:
        leave_ranks()


def _plan_shares(
    out_dir: Path, inputs, overwrite: bool, worker: Worker
) -> tuple[_Plan, list[list[PlannedCase]]]:
    plan = _plan(out_dir, inputs, overwrite)
    shares = _shares(plan.cases, worker.count)
    return plan, shares + [[] for _ in range(worker.count - len(shares))]


def _shares(cases: list[PlannedCase], count: int) -> list[list[PlannedCase]]:
    """``cases`` in ``count`` shares balanced by bytes on disk (no share when no case)."""
    if not cases:
        return []
    sizes = [input_bytes(case.path) for case in cases]
    return [[cases[i] for i in share] for share in split_shares(sizes, count)]


def _plan(out_dir: Path, inputs, overwrite: bool) -> _Plan:
    """List the inputs, refuse taken names and existing outputs; merge a killed run's parts."""
    from liverseg.io import SHARED_TEMP_MIN_AGE_S, remove_stale_temp_files

    out_dir.mkdir(parents=True, exist_ok=True)
    # Temp files of a killed earlier run; another predict may be writing to the same folder now.
    remove_stale_temp_files([out_dir], min_age_s=SHARED_TEMP_MIN_AGE_S)
    files, unlisted = collect_inputs(inputs)
    plan = _Plan(rows=merge_summary_parts(out_dir), unlisted=unlisted)
    claimed: dict[str, Path] = {}
    skipped = False
    for index, path in enumerate(files):
        name = safe_name(case_id_of(path))
        if name in claimed:
            message = f"its output name {name!r} is taken by {claimed[name]}; rename one of them"
            plan.refused.append((index, (path, message)))
            continue
        claimed[name] = path
        existing = [p for p in case_outputs(out_dir, name) if p.exists()]
        if existing and not overwrite:
            message = f"{existing[0]} exists; pass --overwrite to replace it"
            plan.refused.append((index, (path, message)))
            if name not in plan.rows:
                plan.rows[name] = summary_row(name, path, status="skipped: output exists")
                skipped = True
            continue
        plan.cases.append(PlannedCase(index, path, name))
    if skipped:
        write_summary(out_dir / SUMMARY_NAME, plan.rows)
    return plan


def _progress(bar) -> Report:
    return lambda kind, case: bar.update(1) if kind == "done" else None
