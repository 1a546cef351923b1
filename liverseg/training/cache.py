"""The preprocessing cache: each training case preprocessed once into memory-mapped ``.npy`` files.

Preprocessing (inference's own, :mod:`liverseg.preprocessing`): reorient to canonical RAS,
resample to the target spacing when ``data.spacing_mm`` is set (:mod:`liverseg.resampling`), clip
to a fixed HU window and map it to (-1, 1), then CropOrPad to
``data.shape`` centred on the liver, so no liver slice is cut. It runs once per case and is cached
as uncompressed ``.npy`` arrays that the workers memory-map, keyed by the preprocessing settings and
the source files' size and mtime, beside the list of each foreground class's voxels that the patch
sampler draws centres from (nnU-Net's "class locations", here every voxel, not a sample). An entry
whose files are truncated or garbled is logged and rebuilt. Under torchrun each rank preprocesses
its share of the cases, then all read every entry (:func:`build_shared_cache`): no entry is written
by two ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverseg.constants import BACKGROUND
from liverseg.data.cases import Case
from liverseg.errors import DataError
from liverseg.geometry import label_affine_matches, spacing_mm
from liverseg.io import atomic_path, read_labels, read_volume
from liverseg.preprocessing import scale_hu, to_canonical
from liverseg.resampling import resample_image, resample_labels
from liverseg.training import distributed
from liverseg.training.patches import class_locations

log = logging.getLogger(__name__)

# 2: spacing from the affine (liverseg.geometry), no longer the header's float32 zooms.
# 3: class locations beside the arrays; label map stored in C order, as the image is.
CACHE_VERSION = 3


@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case on disk: arrays in canonical orientation, cropped/padded."""

    case_id: str
    image: Path  # float16 (W, H, D) in (-1, 1)
    label: Path  # uint8 (W, H, D)
    spacing_mm: tuple[float, float, float]
    # Flat indices (C order) of the foreground voxels, grouped by class in ascending label value,
    # ascending within a class; the classes and their counts.
    locations: Path
    class_counts: tuple[tuple[int, int], ...]


def load_class_locations(cached: CachedCase) -> dict[int, np.ndarray]:
    """Each foreground class's voxels of a cached case, memory-mapped.

    Returns:
        Label value -> flat (C order) indices of its voxels in the label map, ascending, as
        :func:`liverseg.training.patches.class_locations` lists them.
    """
    locations = np.load(cached.locations, mmap_mode="r")
    bounds = np.cumsum([0] + [count for _, count in cached.class_counts])
    return {c: locations[a:b] for (c, _), a, b in zip(cached.class_counts, bounds, bounds[1:])}


def _save_class_locations(path: Path, label: np.ndarray) -> list[list[int]]:
    """Write each foreground class's voxels of ``label`` to ``path``; the [class, count] pairs."""
    found = class_locations(label)
    dtype = np.int32 if label.size <= np.iinfo(np.int32).max else np.int64
    empty = np.empty(0, dtype)
    with atomic_path(path) as tmp:
        np.save(tmp, np.concatenate([empty, *found.values()]).astype(dtype))
    return [[c, int(v.size)] for c, v in found.items()]


def _cache_key(case: Case, settings: dict) -> str:
    stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (case.image, case.label)]
    text = json.dumps([CACHE_VERSION, settings, stats, str(case.image)], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _liver_centred_window(label: np.ndarray, shape: Sequence[int]) -> list[slice]:
    """Per-axis crop of ``shape`` centred on the liver, widened where the liver is longer."""
    foreground = np.nonzero(label)
    window = []
    for axis, size in enumerate(shape):
        n = label.shape[axis]
        if foreground[axis].size:
            lo, hi = int(foreground[axis].min()), int(foreground[axis].max()) + 1
        else:
            lo, hi = 0, n
        size = max(size, hi - lo)
        start = (lo + hi) // 2 - size // 2
        start = min(max(start, 0), max(n - size, 0))
        window.append(slice(start, min(start + size, n)))
    return window


def _load_aligned(case: Case, tolerance_mm: float, copy_geometry: bool) -> tuple:
    """Image (HU, stored dtype) and uint8 label in canonical orientation, and the image's affine.

    Both are read as 3D (a trailing singleton 4th axis is dropped), never as float64 copies; the
    label takes the image's geometry (checked to agree, or ``copy_geometry``).
    """
    hu, affine = read_volume(case.image)
    labels, label_affine = read_labels(case.label)
    if not label_affine_matches(affine, label_affine, tolerance_mm) and not copy_geometry:
        raise DataError(
            f"{case.label}: affine differs from its image's by more than {tolerance_mm} mm; "
            "run `liverseg check` and set data.copy_label_geometry=true to use the image's"
        )
    if labels.shape != hu.shape:
        raise DataError(
            f"{case.label}: shape {labels.shape} differs from its image's {hu.shape}; "
            "run `liverseg check`"
        )
    canonical_hu, ras_affine = to_canonical(hu, affine)
    canonical_labels, _ = to_canonical(labels, affine)
    return canonical_hu, canonical_labels, ras_affine


def preprocess_case(case: Case, cache_dir: Path, settings: dict) -> CachedCase:
    """Preprocess one case into the cache (or find it there).

    Args:
        case: A labelled case.
        cache_dir: Folder of the cache.
        settings: ``hu_min``, ``hu_max``, ``shape`` (voxels), ``min_size`` (voxels: the patch
            size), ``affine_tolerance_mm``, ``copy_label_geometry``, and optionally
            ``spacing_mm`` (a RAS-ordered target spacing, or None).

    Returns:
        Where the cached arrays are.
    """
    paths = _entry_paths(case, cache_dir, settings)
    image_path, label_path, locations_path, meta_path = paths
    if meta_path.is_file():
        found = _read_cached(case.case_id, *paths)
        if found is not None:
            return found
    hu, labels, ras_affine = _load_aligned(
        case, settings["affine_tolerance_mm"], settings["copy_label_geometry"]
    )
    target = settings.get("spacing_mm")
    if target is not None:  # canonical arrays: the RAS-ordered target applies as it is
        hu, _ = resample_image(hu, ras_affine, target)
        labels, ras_affine = resample_labels(labels, ras_affine, target)
    window = tuple(_liver_centred_window(labels, settings["shape"]))
    scaled = scale_hu(hu[window], settings["hu_min"], settings["hu_max"])
    labels = labels[window]
    target = [max(s, n, settings["min_size"]) for s, n in zip(settings["shape"], labels.shape)]
    pads = [((t - n) // 2, t - n - (t - n) // 2) for t, n in zip(target, labels.shape)]
    scaled = np.pad(scaled, pads, constant_values=-1.0).astype(np.float16)
    # C order, as the image: the label arrives Fortran-ordered from NIfTI, and patches are
    # copied out of both in C order (a transposing copy is many times slower).
    labels = np.ascontiguousarray(np.pad(labels, pads, constant_values=BACKGROUND))
    spacing = spacing_mm(ras_affine)
    for path, array in ((image_path, scaled), (label_path, labels)):
        with atomic_path(path) as tmp:
            np.save(tmp, array)
    counts = _save_class_locations(locations_path, labels)
    with atomic_path(meta_path) as tmp:
        meta = {
            "case_id": case.case_id,
            "spacing_mm": spacing,
            "shape": list(labels.shape),
            "class_counts": counts,
        }
        tmp.write_text(json.dumps(meta))
    return CachedCase(case.case_id, image_path, label_path, spacing, locations_path, _pairs(counts))


def _pairs(counts: list) -> tuple[tuple[int, int], ...]:
    """The meta's [class, count] pairs as a tuple of int pairs."""
    return tuple((int(c), int(n)) for c, n in counts)


def _entry_paths(case: Case, cache_dir: Path, settings: dict) -> tuple[Path, Path, Path, Path]:
    """The image, label, class locations and meta files of a case's cache entry."""
    stem = cache_dir / f"{case.case_id}-{_cache_key(case, settings)}"
    suffixes = ("image.npy", "label.npy", "locations.npy", "json")
    return tuple(Path(f"{stem}.{s}") for s in suffixes)


def find_cached(case: Case, cache_dir: Path, settings: dict) -> CachedCase:
    """The whole cache entry of ``case``, which another rank has written; never writes.

    Raises:
        DataError: The entry is missing or damaged: on several nodes the cache folder is not
            one that every node sees.
    """
    paths = _entry_paths(case, cache_dir, settings)
    found = _read_cached(case.case_id, *paths) if paths[-1].is_file() else None
    if found is None:
        raise DataError(
            f"rank {distributed.rank()}: the cache entry of {case.case_id} is not whole in "
            f"{cache_dir} after the rank that preprocessed it finished; on several nodes run.dir "
            "(or data.cache_dir) must be a folder every node sees"
        )
    return found


def _read_cached(
    case_id: str, image_path: Path, label_path: Path, locations_path: Path, meta_path: Path
) -> CachedCase | None:
    """The cache entry if its four files are whole; None, with a warning, when one is damaged.

    An interrupted copy of a run folder or a disk error can leave a truncated or garbled
    ``.npy`` or ``.json``. Memory-mapping checks each array's header and that its file holds
    all its bytes; shapes and dtypes are checked against each other and the meta's ``shape``,
    the class locations against the meta's counts and the label map's size. The caller
    rebuilds a damaged entry.
    """
    try:
        meta = json.loads(meta_path.read_text())
        spacing = tuple(float(s) for s in meta["spacing_mm"])
        counts = _pairs(meta["class_counts"])
        image = np.load(image_path, mmap_mode="r")
        label = np.load(label_path, mmap_mode="r")
        locations = np.load(locations_path, mmap_mode="r")
        problem = _cache_problem(image, label, spacing, meta["shape"]) or _locations_problem(
            locations, counts, label.size
        )
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return CachedCase(case_id, image_path, label_path, spacing, locations_path, counts)
    log.warning(
        "cache entry %s is damaged (%s); rebuilding it", meta_path.with_suffix(".*"), problem
    )
    return None


def _cache_problem(image, label, spacing: tuple, shape) -> str | None:
    """What is wrong with memory-mapped cached arrays, or None."""
    if image.ndim != 3 or image.shape != label.shape:
        return f"image shape {image.shape} and label shape {label.shape} differ or are not 3D"
    if list(image.shape) != list(shape):
        return f"arrays of shape {image.shape} where the meta records {shape}"
    if image.dtype != np.float16 or label.dtype != np.uint8:
        return f"dtypes {image.dtype}/{label.dtype}, expected float16/uint8"
    if not (image.flags.c_contiguous and label.flags.c_contiguous):
        return "arrays not in C order"
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        return f"spacing {spacing} is not 3 positive numbers"
    return None


def _locations_problem(locations, counts: tuple, size: int) -> str | None:
    """What is wrong with memory-mapped class locations (their ends only are read), or None."""
    if locations.ndim != 1 or locations.dtype.kind != "i":
        return f"class locations of shape {locations.shape} and dtype {locations.dtype}"
    if locations.size != sum(n for _, n in counts) or any(n <= 0 for _, n in counts):
        return f"{locations.size} class locations where the meta counts {counts}"
    sizes = np.array([n for _, n in counts], dtype=np.int64)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    firsts, lasts = locations[starts], locations[ends - 1]
    if (firsts < 0).any() or (lasts >= size).any() or (firsts > lasts).any():
        return "class locations outside the label map"
    return None


def build_cache(
    cases: Sequence[Case], cache_dir: Path, settings: dict, workers: int = 0
) -> list[CachedCase]:
    """Preprocess every case into ``cache_dir`` in ``workers`` processes, reusing the cache."""
    from tqdm import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(case, cache_dir, settings) for case in cases]
    bar = dict(
        total=len(jobs), desc="preprocess", unit="case", leave=False,
        disable=not distributed.is_main(),
    )  # fmt: skip
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(tqdm(pool.map(_preprocess_job, jobs), **bar))
    return [preprocess_case(*job) for job in tqdm(jobs, **bar)]


def build_shared_cache(
    cases: Sequence[Case], cache_dir: Path, settings: dict, workers: int = 0
) -> list[CachedCase]:
    """:func:`build_cache` shared by the ranks of a distributed run; itself in one process.

    Each rank preprocesses its share of ``cases`` (:func:`liverseg.training.distributed.share`),
    waits for the others, then finds every entry (:func:`find_cached`) without writing.
    """
    if distributed.world_size() == 1:
        return build_cache(cases, cache_dir, settings, workers)
    build_cache(distributed.share(list(cases)), cache_dir, settings, workers)
    distributed.wait_for_all()
    return [find_cached(case, cache_dir, settings) for case in cases]


def _preprocess_job(job: tuple) -> CachedCase:
    return preprocess_case(*job)
