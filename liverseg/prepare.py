"""Halve a Task03 folder (the seed's downsampling), resumable.

Every axis of every case is reduced by an integer ``factor`` (2: 512 x 512 x Z -> 256 x 256 x
ceil(Z / 2)), and the result is written to a new folder in the same layout (``imagesTr``,
``labelsTr``, ``imagesTs``, ``dataset.json``) together with ``prepare.json``, which records the
original and new geometry of each case so predictions can be mapped back, and whether the source's
spacing can be trusted (``spacing_trusted``: false for an identity placeholder affine, whose halving
no longer looks like one). A missing ``imagesTs`` means no test cases (with a warning).

Geometry (block-centre convention): new voxel ``i`` covers old voxels ``i*f .. i*f+f-1`` along each
axis and its centre lies at old voxel coordinate ``i*f + (f-1)/2``. The new shape is
``ceil(n / f)``: no voxel is dropped; where ``n`` is not a multiple of ``f`` the last block is
partial (edge voxels repeated for the image, only the voxels present counted for the label), so
the grid then reaches half an old voxel past the old edge. The affine's voxel axes are multiplied
by ``f`` (spacing times ``f``) and the origin moves to the centre of block 0. Orientation is kept
as stored, never reoriented.

Image: Gaussian pre-filter with the sigma of Cardoso et al. (MICCAI 2015, also torchio's
``Resample(antialias=True)``), ``sigma = sqrt(f**2 - 1) / (2 * sqrt(2 * ln 2))`` voxels, then
linear interpolation at the block centres; rounded to int16 HU.

Label: per block of ``f**3`` voxels, count organ voxels (LIVER or TUMOR) and tumor voxels:

1. BACKGROUND where organ voxels are fewer than half the block (``LIVER_MIN_FRACTION``).
2. Otherwise TUMOR where tumor voxels are at least half of the organ voxels
   (``TUMOR_MIN_FRACTION``), even when tumor is not the block's majority (3 tumor, 2 liver,
   3 background -> TUMOR); otherwise LIVER. Ties go to the smaller class.
3. A group of 26-connected blocks that hold any tumor but got no TUMOR block from rule 2 (a lesion
   of a few voxels split over several blocks, or one at the liver's edge) gets TUMOR at its block
   with the largest tumor fraction: every lesion keeps at least one voxel.

Lower tumor thresholds keep thin rims but inflate every lesion: for spheres of radius 3-8 voxels
inside liver at random sub-voxel positions, a 1/4-of-block threshold grew the mean tumor volume by
21-53 %, rules 2-3 by 3-5 %, and they still keep a lesion of one voxel.

Memory: volumes are read at their stored dtype (int16 for Task03) and processed in slabs in
float32; no float64 whole-volume copy is made.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from liverseg.cases import (
    SPLITS,
    Case,
    MissingTestFolderError,
    find_cases,
    label_affine_matches,
)
from liverseg.constants import BACKGROUND, LABEL_NAMES, LABEL_VALUES, LIVER, TUMOR
from liverseg.errors import DataError, LiversegError
from liverseg.files import atomic_path, save_nifti
from liverseg.report import spacing_is_trustworthy

logger = logging.getLogger(__name__)

RECORD_NAME = "prepare.json"
LIVER_MIN_FRACTION = 0.5  # of the block's voxels
TUMOR_MIN_FRACTION = 0.5  # of the block's organ (LIVER or TUMOR) voxels
# Label affines that differ from their image's by at most this (mm, any element) are float
# noise (liver_2): the label is written with the image's new affine so the pair stays consistent.
LABEL_AFFINE_TOLERANCE_MM = 0.01
_SLAB = 32  # slices per slab; bounds float32 working memory to a few slices of the volume
_INT16 = np.iinfo(np.int16)


def antialias_sigma(factor: int) -> float:
    """Gaussian sigma in input voxels for downsampling by ``factor`` (0 for ``factor == 1``)."""
    return math.sqrt(factor**2 - 1) / (2 * math.sqrt(2 * math.log(2)))


def downsampled_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """``ceil(n / factor)`` per axis: the shape written by :func:`downsample_image`."""
    return tuple(-(-int(n) // factor) for n in shape)


def downsampled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """The 4 x 4 affine of the reduced grid (block-centre convention, see the module docstring).

    Args:
        affine: Voxel-to-world matrix of the input, mm; any orientation (RAS, LPS, oblique).
        factor: Integer reduction factor per axis.

    Returns:
        Voxel axes scaled by ``factor``; origin at the centre of the first block.
    """
    index_map = np.diag([factor, factor, factor, 1.0])
    index_map[:3, 3] = (factor - 1) / 2
    return np.asarray(affine, dtype=np.float64) @ index_map


def _reduce_axis(array: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Gaussian pre-filter along ``axis``, then linear samples at the block centres (float32)."""
    n = array.shape[axis]
    sigma = antialias_sigma(factor)
    if sigma > 0:
        array = ndimage.gaussian_filter1d(
            array, sigma, axis=axis, mode="nearest", output=np.float32
        )
    centres = np.minimum(np.arange(-(-n // factor)) * factor + (factor - 1) / 2, n - 1)
    low = np.floor(centres).astype(np.intp)
    high = np.minimum(low + 1, n - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = -1
    weight = (centres - low).astype(np.float32).reshape(weight_shape)
    return np.take(array, low, axis) * (1 - weight) + np.take(array, high, axis) * weight


def downsample_image(
    volume: np.ndarray, factor: int, slope: float = 1.0, inter: float = 0.0
) -> np.ndarray:
    """Antialiased linear reduction of a CT volume by ``factor`` along every axis.

    Args:
        volume: Stored voxel values, shape ``(W, H, D)``, any numeric dtype (int16 in Task03).
        factor: Integer reduction factor per axis (1 copies).
        slope: NIfTI scale slope; HU = stored * slope + inter.
        inter: NIfTI scale intercept.

    Returns:
        HU rounded to int16, shape ``ceil((W, H, D) / factor)``.
    """
    width, height, depth = volume.shape
    new_w, new_h, new_d = downsampled_shape(volume.shape, factor)
    in_plane = np.empty((new_w, new_h, depth), dtype=np.float32)
    for z0 in range(0, depth, _SLAB):
        slab = volume[:, :, z0 : z0 + _SLAB].astype(np.float32)
        if slope != 1 or inter != 0:
            slab = slab * np.float32(slope) + np.float32(inter)
        in_plane[:, :, z0 : z0 + _SLAB] = _reduce_axis(_reduce_axis(slab, 0, factor), 1, factor)
    out = np.empty((new_w, new_h, new_d), dtype=np.int16)
    for x0 in range(0, new_w, _SLAB):
        reduced = _reduce_axis(in_plane[x0 : x0 + _SLAB], 2, factor)
        out[x0 : x0 + _SLAB] = np.clip(np.rint(reduced), _INT16.min, _INT16.max)
    return out


def _block_counts(slab: np.ndarray, factor: int) -> tuple[np.ndarray, ...]:
    """Voxels present, foreground voxels and tumor voxels per ``factor**3`` block of a slab."""
    pad = [(0, -n % factor) for n in slab.shape]
    present = np.pad(np.ones(slab.shape, dtype=bool), pad)
    blocks = np.pad(slab, pad, constant_values=BACKGROUND)
    w, h, d = (n // factor for n in blocks.shape)
    block_shape = (w, factor, h, factor, d, factor)
    axes = (1, 3, 5)
    count = present.reshape(block_shape).sum(axis=axes, dtype=np.uint16)
    tumor = (blocks == TUMOR).reshape(block_shape).sum(axis=axes, dtype=np.uint16)
    foreground = (blocks == LIVER).reshape(block_shape).sum(axis=axes, dtype=np.uint16) + tumor
    return count, foreground, tumor


def _check_label_values(slab: np.ndarray, z0: int) -> None:
    valid = np.isin(slab, LABEL_VALUES)
    if not valid.all():
        found = np.unique(slab[~valid])[:5].tolist()
        raise ValueError(
            f"label values {found} at slices >= {z0}; expected only {list(LABEL_VALUES)} "
            "(background, liver, tumor)"
        )


def downsample_label(label: np.ndarray, factor: int) -> np.ndarray:
    """Reduce a label map by ``factor`` along every axis, keeping small tumors.

    The rule (organ in at least half the block, tumor in at least half of the organ voxels, then
    one TUMOR block for every lesion that would vanish) is in the module docstring.

    Args:
        label: Shape ``(W, H, D)``, values in ``LABEL_VALUES`` (any integer or float dtype).
        factor: Integer reduction factor per axis.

    Returns:
        uint8 labels, shape ``ceil((W, H, D) / factor)``.

    Raises:
        ValueError: A value outside ``LABEL_VALUES``.
    """
    new_shape = downsampled_shape(label.shape, factor)
    out = np.empty(new_shape, dtype=np.uint8)
    tumor_count = np.empty(new_shape, dtype=np.uint16)
    present_count = np.empty(new_shape, dtype=np.uint16)
    step = factor * max(1, _SLAB // factor)
    for z0 in range(0, label.shape[2], step):
        slab = label[:, :, z0 : z0 + step]
        _check_label_values(slab, z0)
        count, foreground, tumor = _block_counts(slab, factor)
        blocks = slice(z0 // factor, z0 // factor + count.shape[2])
        organ = foreground >= LIVER_MIN_FRACTION * count
        tumor_share = tumor >= TUMOR_MIN_FRACTION * foreground
        out[:, :, blocks] = np.where(organ, np.where(tumor_share, TUMOR, LIVER), BACKGROUND)
        tumor_count[:, :, blocks] = tumor
        present_count[:, :, blocks] = count
    _rescue_lost_tumors(out, tumor_count, present_count)
    return out


def _rescue_lost_tumors(out: np.ndarray, tumor_count: np.ndarray, present: np.ndarray) -> None:
    """Give TUMOR to the most tumorous block of each tumor group that lost all its tumor."""
    groups, n_groups = ndimage.label(tumor_count > 0, structure=np.ones((3, 3, 3), dtype=bool))
    for group_id, box in enumerate(ndimage.find_objects(groups), start=1):
        member = groups[box] == group_id
        if (out[box][member] == TUMOR).any():
            continue
        fraction = np.where(member, tumor_count[box] / present[box], -1.0)
        peak = np.unravel_index(np.argmax(fraction), fraction.shape)
        out[tuple(s.start + p for s, p in zip(box, peak, strict=True))] = TUMOR
    logger.debug("checked %d tumor groups", n_groups)


def _load_volume(path: Path) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(stored voxels (W, H, D), affine, slope, inter) of a NIfTI file, or a DataError naming it."""
    if not path.is_file():
        raise DataError(
            f"{path}: not found; expected this case's NIfTI file there (listed by dataset.json "
            "or paired by name). Restore it or remove the case."
        )
    try:
        image = nib.load(str(path))
        stored = np.asarray(image.dataobj.get_unscaled())
        slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:
        raise DataError(
            f"{path}: cannot read it as NIfTI ({type(exc).__name__}: {exc}); expected a "
            ".nii/.nii.gz volume. Re-extract or re-download this file, or move the case out of "
            "the dataset folder."
        ) from exc
    if stored.ndim == 4 and stored.shape[3] == 1:
        stored = stored[..., 0]
    if stored.ndim != 3:
        raise DataError(
            f"{path}: expected a 3D volume (W, H, D), found shape {stored.shape}. "
            "Use single-channel 3D NIfTI files."
        )
    return stored, affine, slope, inter


def _fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def downsample_case(
    image_path: str | Path,
    label_path: str | Path | None,
    out_image: str | Path,
    out_label: str | Path | None,
    factor: int,
) -> dict:
    """Reduce one case by ``factor`` along every axis and write it atomically.

    Args:
        image_path: CT volume, HU, shape ``(W, H, D)``.
        label_path: Its label map (values ``LABEL_VALUES``, same shape) or None (test cases).
        out_image: Destination of the int16 image, shape ``ceil((W, H, D) / factor)``.
        out_label: Destination of the uint8 label, or None.
        factor: Integer reduction factor per axis.

    Returns:
        The case's record: ``factor``, ``source_image`` / ``source_label`` (path, size,
        mtime_ns), ``image`` / ``label`` (outputs), ``original_shape``, ``original_affine``,
        ``new_shape``, ``new_affine`` (4 x 4 lists, mm), ``spacing_trusted`` (False when the
        source's affine is an identity-like placeholder,
        :func:`liverseg.report.spacing_is_trustworthy`: its mm are unreliable, and stay so in
        the output, whatever its new spacing) and, with a label, ``original_label_affine`` and
        ``new_label_affine``.

    Raises:
        DataError: A file is unreadable, not 3D, or the label's shape or values are wrong.
    """
    if (label_path is None) != (out_label is None):
        raise ValueError("label_path and out_label must both be given or both be None")
    image_path = Path(image_path)
    stored, affine, slope, inter = _load_volume(image_path)
    new_affine = downsampled_affine(affine, factor)
    reduced = downsample_image(stored, factor, slope, inter)
    original_shape = stored.shape
    del stored
    save_nifti(reduced, new_affine, out_image)
    record = {
        "factor": factor,
        "source_image": _fingerprint(image_path),
        "source_label": None,
        "image": str(out_image),
        "label": None,
        "original_shape": list(original_shape),
        "original_affine": affine.tolist(),
        "new_shape": list(reduced.shape),
        "new_affine": new_affine.tolist(),
        "spacing_trusted": spacing_is_trustworthy(affine),
    }
    if label_path is None:
        return record
    label_path = Path(label_path)
    label, label_affine, _, _ = _load_volume(label_path)
    if label.shape != original_shape:
        raise DataError(
            f"{label_path}: label shape {label.shape} differs from its image's "
            f"{original_shape} ({image_path}); expected the same voxel grid. Fix or remove "
            "this case."
        )
    try:
        reduced_label = downsample_label(label, factor)
    except ValueError as exc:
        raise DataError(f"{label_path}: {exc}. Fix or remove this case.") from exc
    if label_affine_matches(affine, label_affine, LABEL_AFFINE_TOLERANCE_MM):
        new_label_affine = new_affine
    else:
        logger.warning(
            "%s: label affine differs from its image's by %.3g mm; kept as stored",
            label_path,
            np.abs(label_affine - affine).max(),
        )
        new_label_affine = downsampled_affine(label_affine, factor)
    save_nifti(reduced_label, new_label_affine, out_label)
    record.update(
        source_label=_fingerprint(label_path),
        label=str(out_label),
        original_label_affine=label_affine.tolist(),
        new_label_affine=new_label_affine.tolist(),
    )
    return record


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
    if any(not path.is_file() or stored != _fingerprint(path) for path, stored in sources):
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


def _remove_stale_temps(out: Path) -> None:
    """Delete temp files left by a killed run (atomic_path names them ``.NAME.*.tmp.*``)."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        for stale in (out / folder).glob(".*.tmp.nii*"):
            logger.info("removing unfinished temp file %s", stale)
            stale.unlink(missing_ok=True)


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
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
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
