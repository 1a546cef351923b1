"""``liverseg prepare``: a Task03 folder reduced by an integer factor or resampled to a spacing.

Either every axis of every case is reduced by an integer ``factor`` (2, the seed's halving:
512 x 512 x Z -> 256 x 256 x ceil(Z / 2)), or every case is resampled to a target spacing
``spacing_mm`` (mm per canonical RAS axis, as ``data.spacing_mm``). The result is written to a
new folder in the same layout (``imagesTr``, ``labelsTr``, ``imagesTs``, ``dataset.json``)
together with ``prepare.json``, which records the factor or the spacing, the original and new
geometry of each case so predictions can be mapped back, and whether the source's spacing can be
trusted (``spacing_trusted``: false for an identity placeholder affine, whose halving no longer
looks like one). A missing ``imagesTs`` means no test cases (with a warning). Records written
before ``spacing_mm`` existed load with ``spacing_mm`` None.

One case is reduced by :func:`liverseg.data.downsampling.downsample_case` (the factor's geometry,
image filter and label rule) or resampled by :func:`liverseg.data.respacing.resample_case`. This
module finds the cases, runs them in worker processes, skips those already finished, keeps the
record, and tells training whether its ``data.factor`` / ``data.spacing_mm`` fit a folder
prepared at a spacing (:func:`check_prepared_for_training`).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from liverseg.constants import LABEL_NAMES, LABEL_VALUES
from liverseg.data.cases import SPLITS, Case, MissingTestFolderError, find_cases
from liverseg.data.downsampling import downsample_case
from liverseg.data.respacing import resample_case
from liverseg.errors import DataError, LiversegError
from liverseg.io import atomic_path, fingerprint, remove_stale_temp_files
from liverseg.writable import check_writable_dir

logger = logging.getLogger(__name__)

RECORD_NAME = "prepare.json"
# Spacings within 1% per axis are the same, as liverseg.resampling.needs_resampling judges them.
SPACING_RTOL = 0.01


def load_prepare_record(out_dir: str | Path) -> dict:
    """Read ``OUT_DIR/prepare.json``.

    Returns:
        ``{"factor": int, "spacing_mm": [x, y, z] or None, "source_dir": str,
        "cases": {case_id: record}}``; ``spacing_mm`` (mm, RAS order) is set by
        ``--spacing``, whose records have ``factor`` 1, and None for a factor (and for records
        written before it existed). Each case record is as returned by
        :func:`~liverseg.data.downsampling.downsample_case` or
        :func:`~liverseg.data.respacing.resample_case`, plus ``case_id`` and ``split``, with
        ``image`` and ``label`` relative to ``out_dir``.

    Raises:
        DataError: The file is missing or not a prepare record, or its ``spacing_mm`` is not
            three positive numbers.
    """
    path = Path(out_dir) / RECORD_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: not found; expected the record written by `liverseg prepare SRC_DIR "
            f"{out_dir}`. Run it (again) to create it."
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot read it as JSON ({exc}); rerun `liverseg prepare` into a fresh folder."
        ) from exc
    if not isinstance(record, dict) or not {"factor", "cases"} <= record.keys():
        found = sorted(record)[:5] if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{path}: expected keys 'factor' and 'cases', found {found}; "
            "this is not a liverseg prepare record."
        )
    spacing = record.setdefault("spacing_mm", None)
    if spacing is not None and _spacing_problem(spacing) is not None:
        raise DataError(
            f"{path}: 'spacing_mm' is {spacing!r}, expected three numbers > 0 mm (x, y, z in RAS "
            "order) or null; rerun `liverseg prepare --spacing X Y Z` into a fresh folder."
        )
    return record


def _spacing_problem(spacing) -> str | None:
    """What is wrong with a target spacing (three finite numbers > 0 mm), or None."""
    try:
        values = [v for v in spacing if not isinstance(v, (str, bytes, bool))]
        values = [float(v) for v in values] if len(values) == len(spacing) == 3 else None
    except (TypeError, ValueError):
        values = None
    if values is None or isinstance(spacing, (str, bytes)):
        return "expected three numbers"
    if not all(math.isfinite(v) and v > 0 for v in values):
        return "each must be a finite number > 0 mm"
    return None


def _show_spacing(spacing: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in spacing) + " mm"


def _as_override(spacing: Sequence[float]) -> str:
    """``spacing`` as a ``data.spacing_mm=`` value: ``[1.4,1.4,4]``."""
    return "[" + ",".join(f"{v:g}" for v in spacing) + "]"


def _write_json(path: Path, content: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=1) + "\n")


def _find_split(src: Path, split: str) -> list[Case]:
    """The cases of ``split``; a missing test folder means no test cases, with a warning."""
    try:
        return find_cases(src, split=split)
    except MissingTestFolderError as exc:
        logger.warning("%s; preparing no test cases", exc)
        return []


def _jobs(src: Path, out: Path) -> list[dict]:
    """One job per case found in ``src``: ids, split, source and output paths."""
    jobs = []
    for split, (image_folder, label_folder) in SPLITS.items():
        for case in _find_split(src, split):
            has_label = label_folder is not None and case.label is not None
            jobs.append(
                {
                    "case_id": case.case_id,
                    "split": split,
                    "image_path": Path(case.image),
                    "label_path": Path(case.label) if has_label else None,
                    "image": f"{image_folder}/{Path(case.image).name}",
                    "label": f"{label_folder}/{Path(case.label).name}" if has_label else None,
                }
            )
    ids = [job["case_id"] for job in jobs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(
            f"{src}: case ids {duplicates} occur more than once across imagesTr and imagesTs; "
            "expected unique names. Rename or remove the duplicates."
        )
    return jobs


def _is_finished(job: dict, record: dict | None, out: Path) -> bool:
    """A case is finished when its record matches its sources and its outputs exist."""
    if record is None or record.get("label") != job["label"]:
        return False
    sources = [(job["image_path"], record.get("source_image"))]
    if job["label_path"] is not None:
        sources.append((job["label_path"], record.get("source_label")))
    if any(not path.is_file() or stored != fingerprint(path) for path, stored in sources):
        return False
    outputs = [job["image"]] + ([job["label"]] if job["label"] else [])
    return all((out / name).is_file() for name in outputs)


def _run_job(job: dict, out_dir: str, factor: int, spacing_mm: list[float] | None) -> dict:
    """Worker: reduce or resample one case; its record's output paths are relative to out_dir."""
    out = Path(out_dir)
    label_out = out / job["label"] if job["label"] else None
    sources = (job["image_path"], job["label_path"], out / job["image"], label_out)
    if spacing_mm is None:
        record = downsample_case(*sources, factor)
    else:
        record = resample_case(*sources, spacing_mm)
    record.update(case_id=job["case_id"], split=job["split"], image=job["image"])
    record["label"] = job["label"]
    return record


def _method(factor: int, spacing_mm: Sequence[float] | None) -> str:
    """How a folder is prepared, in words: ``factor 2`` or ``spacing 1.5 x 1.5 x 3 mm``."""
    return f"factor {factor}" if spacing_mm is None else f"spacing {_show_spacing(spacing_mm)}"


def _open_record(out: Path, src: Path, factor: int, spacing_mm: list[float] | None) -> dict:
    if not (out / RECORD_NAME).is_file():
        return {
            "factor": factor,
            "spacing_mm": spacing_mm,
            "source_dir": str(src.resolve()),
            "cases": {},
        }
    record = load_prepare_record(out)
    before, now = (record["factor"], record["spacing_mm"]), (factor, spacing_mm)
    if before != now:
        raise DataError(
            f"{out / RECORD_NAME}: {out} was prepared with {_method(*before)}, this run asks "
            f"for {_method(*now)}. Use the same --factor or --spacing to resume, or a fresh "
            "OUT_DIR."
        )
    record["source_dir"] = str(src.resolve())
    return record


def _execute(
    todo: list[dict], out: Path, method: tuple[int, list[float] | None], workers: int, on_done
) -> list[str]:
    """Run the jobs (in this process when ``workers == 1``); return one message per failure."""
    failures = []
    with tqdm(total=len(todo), desc="prepare", unit="case", disable=None) as progress:

        def settle(job: dict, get_result) -> None:
            failure = _settle(job, get_result, on_done)
            if failure is not None:
                failures.append(failure)
            progress.update()

        if workers == 1:
            for job in todo:
                settle(job, lambda job=job: _run_job(job, str(out), *method))
        else:
            _run_in_pool(todo, out, method, workers, settle)
    return failures


def _run_in_pool(
    todo: list[dict], out: Path, method: tuple[int, list[float] | None], workers: int, settle
) -> None:
    """Run the jobs in ``workers`` spawned processes; settle each as it finishes."""
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
    try:
        futures = {pool.submit(_run_job, job, str(out), *method): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            settle(futures[future], future.result)
    finally:
        # On Ctrl-C, stop at the cases already running instead of working through the queue.
        pool.shutdown(wait=True, cancel_futures=True)


def _settle(job: dict, get_result, on_done) -> str | None:
    """Pass the job's record to ``on_done``; return why the job failed, or None."""
    try:
        on_done(get_result())
    except LiversegError as exc:
        return f"{job['case_id']}: {exc}"
    except concurrent.futures.process.BrokenProcessPool:
        return (
            f"{job['case_id']}: a worker process died (killed, or out of memory?) before "
            f"finishing {job['image_path']}; rerun with fewer --workers"
        )
    except Exception as exc:
        logger.error("%s failed", job["case_id"], exc_info=True)
        return (
            f"{job['case_id']}: unexpected {type(exc).__name__}: {exc} "
            f"({job['image_path']}; traceback logged above)"
        )
    return None


def _write_dataset_json(src: Path, out: Path, records: list[dict]) -> None:
    """Copy the source's dataset.json with training/test lists of the cases written."""
    content = {
        "name": "Liver",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(value): LABEL_NAMES[value] for value in LABEL_VALUES},
    }
    source = src / "dataset.json"
    if source.is_file():
        try:
            content = json.loads(source.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("%s: unreadable (%s); writing a new dataset.json", source, exc)
    training = [r for r in records if r["split"] == "training"]
    test = [r for r in records if r["split"] == "test"]
    content["training"] = [
        {"image": f"./{r['image']}", "label": f"./{r['label']}"} for r in training
    ]
    content["test"] = [f"./{r['image']}" for r in test]
    content["numTraining"], content["numTest"] = len(training), len(test)
    _write_json(out / "dataset.json", content)


def _summary(
    src: Path, out: Path, method: tuple[int, list[float] | None], records: list[dict], written: int
) -> str:
    n_train = sum(r["split"] == "training" for r in records)
    factor, spacing = method
    how = (
        f"every axis reduced by {factor}"
        if spacing is None
        else f"resampled to {_show_spacing(spacing)} (x, y, z in RAS order)"
    )
    text = (
        f"prepared {len(records)} cases ({n_train} training with labels, "
        f"{len(records) - n_train} test) from {src} into {out}, {how}: "
        f"{written} written now, {len(records) - written} already finished and skipped."
    )
    if records:
        first = records[0]
        old_mm = nib.affines.voxel_sizes(np.array(first["original_affine"]))
        new_mm = nib.affines.voxel_sizes(np.array(first["new_affine"]))
        text += (
            f" E.g. {first['case_id']}: {_times(first['original_shape'])} voxels of "
            f"{_times(old_mm, '.2f')} mm -> {_times(first['new_shape'])} of "
            f"{_times(new_mm, '.2f')} mm."
        )
    untrusted = [r["case_id"] for r in records if r.get("spacing_trusted") is False]
    if untrusted:
        text += (
            f" {len(untrusted)} cases have an identity-like placeholder affine (spacing_trusted "
            f"false), so their mm and mL stay unreliable: {', '.join(untrusted[:5])}"
            + (", ..." if len(untrusted) > 5 else "")
            + "."
        )
    return text + f" Geometry of every case: {out / RECORD_NAME}."


def _times(values, spec: str = "d") -> str:
    return " x ".join(format(v, spec) for v in values)


def _checked_method(
    factor: int | None, spacing_mm: Sequence[float] | None
) -> tuple[int, list[float] | None]:
    """``(factor, spacing_mm)`` to prepare with: a factor (default 2) or a spacing, not both."""
    if spacing_mm is None:
        factor = 2 if factor is None else factor
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise LiversegError(f"--factor: expected an integer >= 1, found {factor!r}.")
        return factor, None
    if factor is not None:
        raise LiversegError(
            f"--factor {factor} and --spacing {spacing_mm} exclude each other: a target spacing "
            "replaces the reduction factor (as data.spacing_mm does data.factor). Give one."
        )
    problem = _spacing_problem(spacing_mm)
    if problem is not None:
        raise LiversegError(
            f"--spacing: {problem} (mm, x y z in RAS order, as data.spacing_mm), found "
            f"{spacing_mm!r}; e.g. --spacing 0.8 0.8 2.5."
        )
    return 1, [float(v) for v in spacing_mm]


def _check_workers_and_folders(workers: int | None, src: Path, out: Path) -> None:
    """Refuse fewer than one worker, and an OUT_DIR that is SRC_DIR."""
    if workers is not None and workers < 1:
        raise LiversegError(f"--workers: expected an integer >= 1, found {workers}.")
    if out.resolve() == src.resolve():
        raise DataError(
            f"{out}: OUT_DIR is SRC_DIR; prepare never overwrites its input. Pick another folder."
        )


def _start_output(
    src: Path, out: Path, jobs: list[dict], method: tuple[int, list[float] | None]
) -> tuple[dict, list[dict]]:
    """Create OUT_DIR and open its record without the unfinished cases; return it and them."""
    check_writable_dir(out, "OUT_DIR")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files([out / folder for folder in ("imagesTr", "labelsTr", "imagesTs")])
    record = _open_record(out, src, *method)
    todo = [job for job in jobs if not _is_finished(job, record["cases"].get(job["case_id"]), out)]
    for job in todo:
        record["cases"].pop(job["case_id"], None)
    _write_json(out / RECORD_NAME, record)
    logger.info("%d cases found, %d to do", len(jobs), len(todo))
    return record, todo


def prepare_dataset(
    src_dir: str | Path,
    out_dir: str | Path,
    factor: int | None = None,
    workers: int | None = None,
    spacing_mm: Sequence[float] | None = None,
) -> str:
    """Reduce every case of a Task03 folder by ``factor``, or resample it to ``spacing_mm``.

    Writes ``imagesTr``, ``labelsTr``, ``imagesTs``, ``dataset.json`` and ``prepare.json`` to
    ``out_dir``. A rerun skips cases whose record and outputs exist and whose source files are
    unchanged; a case interrupted mid-write is redone. A folder is resumed only with the factor
    or spacing it was started with.

    Args:
        src_dir: Task03 folder (imagesTr, labelsTr, optional imagesTs and dataset.json).
        out_dir: Destination folder; must differ from ``src_dir``.
        factor: Integer reduction factor per axis (2 halves); default 2 unless ``spacing_mm``.
        workers: Processes; default ``os.cpu_count()``; 1 runs in this process. Each holds one
            case (with ``factor``, roughly twice its stored size plus ~150 MB; with
            ``spacing_mm``, a few float32 copies of it), so lower it where memory is short.
            Workers are spawned: a script calling this needs ``if __name__ == "__main__":``.
        spacing_mm: Target spacing, mm per canonical RAS axis (x, y, z), as ``data.spacing_mm``:
            every case resampled by :func:`~liverseg.data.respacing.resample_case`, recorded
            with factor 1. Excludes ``factor``.

    Returns:
        A one-paragraph summary for the user.

    Raises:
        DataError: Bad arguments or folders, or after all cases ran, one or more failed cases
            (each with its message naming the file); the others are written.
        UnwritableError: ``out_dir`` cannot be created or written (checked before any case).
    """
    src, out = Path(src_dir), Path(out_dir)
    method = _checked_method(factor, spacing_mm)
    _check_workers_and_folders(workers, src, out)
    jobs = _jobs(src, out)
    record, todo = _start_output(src, out, jobs, method)

    def on_done(case_record: dict) -> None:
        record["cases"][case_record["case_id"]] = case_record
        _write_json(out / RECORD_NAME, record)

    n_workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    failures = _execute(todo, out, method, n_workers, on_done) if todo else []
    done = [record["cases"][job["case_id"]] for job in jobs if job["case_id"] in record["cases"]]
    _write_dataset_json(src, out, done)
    if failures:
        raise DataError(
            f"{len(failures)} of {len(jobs)} cases failed ({len(done)} are written to {out}; "
            "fix or remove the files below and rerun, finished cases are skipped):\n  "
            + "\n  ".join(failures)
        )
    return _summary(src, out, method, done, written=len(todo))


def check_prepared_for_training(
    root: str | Path, factor: int, spacing_mm: Sequence[float] | None
) -> None:
    """Refuse ``data.factor`` / ``data.spacing_mm`` that do not fit a root prepared at a spacing.

    A root written by ``liverseg prepare --spacing S`` holds scans at ``S``; the checkpoint must
    say so, or inference would predict original scans at their own spacing (or reduce them by
    ``data.factor``) while the model learned ``S``. So:

    - ``spacing_mm`` equal to ``S`` (1% per axis): fine, the cache's resampling has nothing to
      do (logged);
    - ``spacing_mm`` coarser than or equal to ``S`` on every axis: resampled a second time in the
      cache (a warning);
    - ``spacing_mm`` null, or finer than ``S`` on an axis (detail that ``prepare`` removed, and
      that the scans inference resamples from the originals still have): refused.

    A root without ``prepare.json``, or prepared with a factor, is not checked.

    Args:
        root: ``data.root``.
        factor: ``data.factor``.
        spacing_mm: ``data.spacing_mm`` (mm, RAS order) or None.

    Raises:
        DataError: The combination is refused, or ``prepare.json`` is unreadable; names the file
            and the fix.
    """
    root = Path(root)
    path = root / RECORD_NAME
    if not path.is_file():
        return
    prepared = load_prepare_record(root)["spacing_mm"]
    if prepared is None:
        return
    if spacing_mm is None:
        shown = _show_spacing(prepared)
        raise DataError(
            f"{path}: {root} was resampled to {shown} by `liverseg prepare --spacing`, but "
            f"data.spacing_mm is null (data.factor={factor}): the checkpoint would not tell "
            f"inference to resample scans to {shown}. Set data.spacing_mm="
            f"{_as_override(prepared)} data.factor=1."
        )
    _check_target_spacing(root, prepared, spacing_mm)


def _check_target_spacing(root: Path, prepared: list[float], spacing_mm: Sequence[float]) -> None:
    """Accept ``spacing_mm`` equal to or coarser than the ``prepared`` one; refuse a finer one."""
    path, shown = root / RECORD_NAME, _show_spacing(prepared)
    if all(abs(t - s) <= SPACING_RTOL * s for t, s in zip(spacing_mm, prepared)):
        logger.info("%s: %s is already at data.spacing_mm (%s)", path, root, shown)
        return
    if all(t >= s * (1 - SPACING_RTOL) for t, s in zip(spacing_mm, prepared)):
        logger.warning(
            "%s: %s was resampled to %s by `liverseg prepare`; the cache resamples it again to "
            "data.spacing_mm=%s. Prepare the originals at that spacing to resample them once.",
            path,
            root,
            shown,
            _show_spacing(spacing_mm),
        )
        return
    raise DataError(
        f"{path}: {root} was resampled to {shown} by `liverseg prepare --spacing`, coarser on "
        f"some axis than data.spacing_mm={_show_spacing(spacing_mm)}: the model would learn "
        "from blurrier scans than the originals that inference resamples to that spacing. "
        f"Set data.spacing_mm={_as_override(prepared)}, or prepare the originals again with "
        "`liverseg prepare SRC_DIR OUT_DIR --spacing X Y Z` at the spacing you want."
    )
