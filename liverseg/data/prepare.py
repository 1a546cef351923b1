"""Halve a Task03 folder (the seed's downsampling), resumable.

Every axis of every case is reduced by an integer ``factor`` (2: 512 x 512 x Z -> 256 x 256 x
ceil(Z / 2)), and the result is written to a new folder in the same layout (``imagesTr``,
``labelsTr``, ``imagesTs``, ``dataset.json``) together with ``prepare.json``, which records the
original and new geometry of each case so predictions can be mapped back, and whether the source's
spacing can be trusted (``spacing_trusted``: false for an identity placeholder affine, whose halving
no longer looks like one). A missing ``imagesTs`` means no test cases (with a warning).

The geometry, the image filter and the label rule are in :mod:`liverseg.data.downsampling`;
this module finds the cases, runs them in worker processes, skips those already finished and
keeps the record.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from liverseg.constants import LABEL_NAMES, LABEL_VALUES
from liverseg.data.cases import SPLITS, Case, MissingTestFolderError, find_cases
from liverseg.data.downsampling import downsample_case
from liverseg.errors import DataError, LiversegError
from liverseg.io import atomic_path, fingerprint, remove_stale_temp_files
from liverseg.writable import check_writable_dir

logger = logging.getLogger(__name__)

RECORD_NAME = "prepare.json"


def load_prepare_record(out_dir: str | Path) -> dict:
    """Read ``OUT_DIR/prepare.json``.

    Returns:
        ``{"factor": int, "source_dir": str, "cases": {case_id: record}}``; each record as
        returned by :func:`downsample_case` plus ``case_id`` and ``split``, with ``image`` and
        ``label`` relative to ``out_dir``.

    Raises:
        DataError: The file is missing or not a prepare record.
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
    return record


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


def _run_job(job: dict, out_dir: str, factor: int) -> dict:
    """Worker: downsample one case; the record's output paths are relative to ``out_dir``."""
    out = Path(out_dir)
    label_out = out / job["label"] if job["label"] else None
    record = downsample_case(
        job["image_path"], job["label_path"], out / job["image"], label_out, factor
    )
    record.update(case_id=job["case_id"], split=job["split"], image=job["image"])
    record["label"] = job["label"]
    return record


def _open_record(out: Path, src: Path, factor: int) -> dict:
    if not (out / RECORD_NAME).is_file():
        return {"factor": factor, "source_dir": str(src.resolve()), "cases": {}}
    record = load_prepare_record(out)
    if record["factor"] != factor:
        raise DataError(
            f"{out / RECORD_NAME}: {out} was prepared with factor {record['factor']}, this run "
            f"asks for {factor}. Use the same factor to resume, or a fresh OUT_DIR."
        )
    record["source_dir"] = str(src.resolve())
    return record


def _execute(todo: list[dict], out: Path, factor: int, workers: int, on_done) -> list[str]:
    """Run the jobs (in this process when ``workers == 1``); return one message per failure."""
    failures = []
    progress = tqdm(total=len(todo), desc="prepare", unit="case", disable=None)

    def settle(job: dict, get_result) -> None:
        try:
            on_done(get_result())
        except LiversegError as exc:
            failures.append(f"{job['case_id']}: {exc}")
        except concurrent.futures.process.BrokenProcessPool:
            failures.append(
                f"{job['case_id']}: a worker process died (killed, or out of memory?) before "
                f"finishing {job['image_path']}; rerun with fewer --workers"
            )
        except Exception as exc:
            logger.error("%s failed", job["case_id"], exc_info=True)
            failures.append(
                f"{job['case_id']}: unexpected {type(exc).__name__}: {exc} "
                f"({job['image_path']}; traceback logged above)"
            )
        progress.update()

    with progress:
        if workers == 1:
            for job in todo:
                settle(job, lambda job=job: _run_job(job, str(out), factor))
            return failures
        context = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
        try:
            futures = {pool.submit(_run_job, job, str(out), factor): job for job in todo}
            for future in concurrent.futures.as_completed(futures):
                settle(futures[future], future.result)
        finally:
            # On Ctrl-C, stop at the cases already running instead of working through the queue.
            pool.shutdown(wait=True, cancel_futures=True)
    return failures


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


def _summary(src: Path, out: Path, factor: int, records: list[dict], written: int) -> str:
    n_train = sum(r["split"] == "training" for r in records)
    text = (
        f"prepared {len(records)} cases ({n_train} training with labels, "
        f"{len(records) - n_train} test) from {src} into {out}, every axis reduced by {factor}: "
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


def prepare_dataset(
    src_dir: str | Path, out_dir: str | Path, factor: int = 2, workers: int | None = None
) -> str:
    """Reduce every case of a Task03 folder by ``factor`` along every axis (resumable).

    Writes ``imagesTr``, ``labelsTr``, ``imagesTs``, ``dataset.json`` and ``prepare.json`` to
    ``out_dir``. A rerun skips cases whose record and outputs exist and whose source files are
    unchanged; a case interrupted mid-write is redone.

    Args:
        src_dir: Task03 folder (imagesTr, labelsTr, optional imagesTs and dataset.json).
        out_dir: Destination folder; must differ from ``src_dir``.
        factor: Integer reduction factor per axis (2 halves).
        workers: Processes; default ``os.cpu_count()``; 1 runs in this process. Each holds one
            case (roughly twice its stored size plus ~150 MB), so lower it where memory is short.
            Workers are spawned: a script calling this needs ``if __name__ == "__main__":``.

    Returns:
        A one-paragraph summary for the user.

    Raises:
        DataError: Bad arguments or folders, or after all cases ran, one or more failed cases
            (each with its message naming the file); the others are written.
        UnwritableError: ``out_dir`` cannot be created or written (checked before any case).
    """
    src, out = Path(src_dir), Path(out_dir)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise LiversegError(f"--factor: expected an integer >= 1, found {factor!r}.")
    if workers is not None and workers < 1:
        raise LiversegError(f"--workers: expected an integer >= 1, found {workers}.")
    if out.resolve() == src.resolve():
        raise DataError(
            f"{out}: OUT_DIR is SRC_DIR; prepare never overwrites its input. Pick another folder."
        )
    jobs = _jobs(src, out)
    check_writable_dir(out, "OUT_DIR")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files([out / folder for folder in ("imagesTr", "labelsTr", "imagesTs")])
    record = _open_record(out, src, factor)
    todo = [job for job in jobs if not _is_finished(job, record["cases"].get(job["case_id"]), out)]
    for job in todo:
        record["cases"].pop(job["case_id"], None)
    _write_json(out / RECORD_NAME, record)
    logger.info("%d cases found, %d to do", len(jobs), len(todo))

    def on_done(case_record: dict) -> None:
        record["cases"][case_record["case_id"]] = case_record
        _write_json(out / RECORD_NAME, record)

    n_workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    failures = _execute(todo, out, factor, n_workers, on_done) if todo else []
    done = [record["cases"][job["case_id"]] for job in jobs if job["case_id"] in record["cases"]]
    _write_dataset_json(src, out, done)
    if failures:
        raise DataError(
            f"{len(failures)} of {len(jobs)} cases failed ({len(done)} are written to {out}; "
            "fix or remove the files below and rerun, finished cases are skipped):\n  "
            + "\n  ".join(failures)
        )
    return _summary(src, out, factor, done, written=len(todo))
