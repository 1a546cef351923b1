"""The training data pipeline: split, preprocessing cache, tio.Subject, LabelSampler, Queue, loader.

Preprocessing (identical to inference's): reorient to canonical RAS, clip to a fixed HU window and
map it to (-1, 1) (:func:`liverseg.transforms.intensity_transform`), then CropOrPad to
``data.shape`` centred on the liver, so no liver slice is cut. It runs once per case and is cached
as uncompressed ``.npy`` arrays that the workers memory-map, keyed by the preprocessing settings and
the source files' size and mtime.

Augmentation works on a patch with a margin instead of the whole volume: the sampler draws a centre
the way ``tio.LabelSampler`` does (a class with the configured probability among the classes
present, then a voxel of that class uniformly), and resamples a rotated, scaled patch around it from
a crop just large enough to hold it, with the ranges of ``RandomAffine(scales, degrees)`` in
physical space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio

from liverseg.cases import Case, label_affine_matches
from liverseg.constants import BACKGROUND, CASE_ID, IMAGE, LABEL
from liverseg.errors import DataError
from liverseg.files import atomic_path
from liverseg.inference import read_volume

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def load_or_create_split(
    path: Path, case_ids: Sequence[str], num_train: int, seed: int, split_file: str | None = None
) -> dict[str, list[str]]:
    """The train/validation split: read from ``split_file`` or ``path``, else a seeded shuffle.

    The split is written once to ``path`` and reused on every later run (and on resume), so the
    validation cases never leak into training.

    Args:
        path: ``<run dir>/split.json``.
        case_ids: Every training case id found in the dataset.
        num_train: Cases for training; the rest validate.
        seed: Seed of the shuffle.
        split_file: A split.json to use verbatim instead.

    Returns:
        ``{"train": [...], "val": [...]}``.
    """
    source = Path(split_file) if split_file else path
    if source.is_file():
        split = json.loads(source.read_text())
        unknown = sorted(set(split.get("train", []) + split.get("val", [])) - set(case_ids))
        if unknown or not split.get("train"):
            raise DataError(
                f"{source}: split names cases not in the dataset ({', '.join(unknown[:10])})"
                " or has no training case; delete it or fix data.root"
            )
    else:
        if not 0 < num_train < len(case_ids):
            raise DataError(
                f"data.num_train={num_train} but the dataset holds {len(case_ids)} cases; "
                f"set data.num_train between 1 and {len(case_ids) - 1}"
            )
        shuffled = sorted(case_ids)
        random.Random(seed).shuffle(shuffled)
        split = {"train": sorted(shuffled[:num_train]), "val": sorted(shuffled[num_train:])}
    if source != path or not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(split, indent=1))
    return split


@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case on disk: arrays in canonical orientation, cropped/padded."""

    case_id: str
    image: Path  # float16 (W, H, D) in (-1, 1)
    label: Path  # uint8 (W, H, D)
    spacing_mm: tuple[float, float, float]


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
    """Image (HU, stored dtype) and label as canonical nibabel images sharing the image's affine.

    Both are read as 3D (a trailing singleton 4th axis is dropped), never as float64 copies.
    """
    hu, affine = read_volume(case.image)
    labels, label_affine = read_volume(case.label)
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
    image = nib.as_closest_canonical(nib.Nifti1Image(hu, affine))
    label = nib.as_closest_canonical(nib.Nifti1Image(labels.astype(np.uint8), affine))
    return image, label


def preprocess_case(case: Case, cache_dir: Path, settings: dict) -> CachedCase:
    """Preprocess one case into the cache (or find it there).

    Args:
        case: A labelled case.
        cache_dir: Folder of the cache.
        settings: ``hu_min``, ``hu_max``, ``shape`` (voxels), ``min_size`` (voxels: the patch
            size), ``affine_tolerance_mm``, ``copy_label_geometry``.

    Returns:
        Where the cached arrays are.
    """
    stem = cache_dir / f"{case.case_id}-{_cache_key(case, settings)}"
    image_path, label_path, meta_path = (
        Path(f"{stem}.{s}") for s in ("image.npy", "label.npy", "json")
    )
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return CachedCase(case.case_id, image_path, label_path, tuple(meta["spacing_mm"]))
    image, label = _load_aligned(
        case, settings["affine_tolerance_mm"], settings["copy_label_geometry"]
    )
    labels = np.asarray(label.dataobj).astype(np.uint8)
    window = tuple(_liver_centred_window(labels, settings["shape"]))
    hu = np.asarray(image.dataobj[window], dtype=np.float32)
    labels = labels[window]
    lo, hi = settings["hu_min"], settings["hu_max"]
    scaled = (np.clip(hu, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    target = [max(s, n, settings["min_size"]) for s, n in zip(settings["shape"], labels.shape)]
    pads = [((t - n) // 2, t - n - (t - n) // 2) for t, n in zip(target, labels.shape)]
    scaled = np.pad(scaled, pads, constant_values=-1.0).astype(np.float16)
    labels = np.pad(labels, pads, constant_values=BACKGROUND)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    for path, array in ((image_path, scaled), (label_path, labels)):
        with atomic_path(path) as tmp:
            np.save(tmp, array)
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({"case_id": case.case_id, "spacing_mm": spacing}))
    return CachedCase(case.case_id, image_path, label_path, spacing)


def build_cache(
    cases: Sequence[Case], cache_dir: Path, settings: dict, workers: int = 0
) -> list[CachedCase]:
    """Preprocess every case into ``cache_dir`` in ``workers`` processes, reusing the cache."""
    from tqdm import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(case, cache_dir, settings) for case in cases]
    bar = dict(total=len(jobs), desc="preprocess", unit="case", leave=False)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(tqdm(pool.map(_preprocess_job, jobs), **bar))
    return [preprocess_case(*job) for job in tqdm(jobs, **bar)]


def _preprocess_job(job: tuple) -> CachedCase:
    return preprocess_case(*job)


def build_subject(cached: CachedCase) -> tio.Subject:
    """A tio.Subject over the memory-mapped cached arrays: nothing is read until a patch is cut.

    Returns:
        Subject with ``image`` (1, W, H, D) float16 in (-1, 1), ``label`` (1, W, H, D) uint8 and
        ``case_id``; the affine holds the spacing only (the arrays are canonical).
    """
    affine = np.diag([*cached.spacing_mm, 1.0])
    with warnings.catch_warnings():
        # The read-only memory map is never written: patches are copied out of it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        image = torch.from_numpy(np.load(cached.image, mmap_mode="r")[None])
        label = torch.from_numpy(np.load(cached.label, mmap_mode="r")[None])
    return tio.Subject(
        {
            IMAGE: tio.ScalarImage(tensor=image, affine=affine),
            LABEL: tio.LabelMap(tensor=label, affine=affine),
            CASE_ID: cached.case_id,
        }
    )


def sample_centres(
    label: np.ndarray,
    patch_size: int,
    probabilities: dict[int, float],
    n: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Patch centres drawn as ``tio.LabelSampler`` draws them.

    A class is chosen with its probability, renormalised over the classes present among the
    voxels where a whole patch fits; then a voxel of that class, uniformly.

    Args:
        label: Label map (W, H, D).
        patch_size: Patch side (voxels).
        probabilities: Label value -> probability.
        n: Number of centres.
        rng: Random generator.

    Returns:
        Integer array (n, 3) of voxel indices.
    """
    lo = patch_size // 2
    hi = [size - (patch_size - 1) // 2 for size in label.shape]
    valid = label[lo : hi[0], lo : hi[1], lo : hi[2]]
    indices = {c: np.flatnonzero(valid == c) for c in probabilities if c != BACKGROUND}
    has_background = bool((valid == BACKGROUND).any())
    present = [
        c for c in probabilities if (c == BACKGROUND and has_background) or indices.get(c, []).size
    ]
    weights = np.array([probabilities[c] for c in present], dtype=np.float64)
    classes = rng.choice(present, size=n, p=weights / weights.sum())
    flat = []
    for c in classes:
        if c == BACKGROUND:
            # Rejection sampling: background is most voxels, listing them all would be slow.
            for _ in range(1000):
                index = int(rng.integers(valid.size))
                if valid.flat[index] == BACKGROUND:
                    break
            else:  # background is rare here: list it after all
                index = int(rng.choice(np.flatnonzero(valid == BACKGROUND)))
        else:
            index = int(rng.choice(indices[c]))
        flat.append(index)
    return np.stack(np.unravel_index(np.array(flat), valid.shape), axis=1) + lo


def random_affine_matrix(
    scales: Sequence[float],
    degrees: Sequence[float],
    spacing_mm: Sequence[float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Voxel-space matrix of a random rotation and scaling made in physical space.

    Draws one scale per axis from ``scales`` and one angle per axis from ``degrees``, as
    ``tio.RandomAffine`` does; a scale above 1 zooms in.

    Returns:
        (3, 3) matrix mapping an output voxel offset to a source voxel offset.
    """
    s = rng.uniform(*scales, size=3)
    ax, ay, az = np.deg2rad(rng.uniform(*degrees, size=3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    d = np.diag(spacing_mm)
    return np.linalg.inv(d) @ rz @ ry @ rx @ np.diag(1.0 / s) @ d


def _crop_padded(array: np.ndarray, start: np.ndarray, size: np.ndarray, fill: float) -> np.ndarray:
    """array[start:start+size] with out-of-bounds parts filled, read only where inside."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src = [slice(max(a, 0), min(a + n, dim)) for a, n, dim in zip(start, size, array.shape)]
    dst = [slice(s.start - a, s.stop - a) for s, a in zip(src, start)]
    out[tuple(dst)] = array[tuple(src)]
    return out


def extract_patch(
    image: np.ndarray,
    label: np.ndarray,
    centre: np.ndarray,
    patch_size: int,
    matrix: np.ndarray | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a patch around ``centre``, resampled through ``matrix`` when given.

    Only a crop just large enough to hold the rotated, scaled patch is read and resampled
    (trilinear for the image, nearest for the label); outside the volume the image is -1 (the
    clipped minimum) and the label background. Voxel ``k`` of the patch sits at offset
    ``k - patch_size // 2`` from the centre, torchio's convention.

    Returns:
        image (P, P, P) float32 and label (P, P, P) uint8.
    """
    half = patch_size // 2
    if matrix is None:
        start = centre - half
        size = np.array([patch_size] * 3)
        return (
            torch.from_numpy(_crop_padded(image, start, size, -1.0).astype(np.float32)),
            torch.from_numpy(_crop_padded(label, start, size, BACKGROUND)),
        )
    extent = np.ceil(np.abs(matrix).sum(axis=1) * (half + 1)).astype(int) + 1
    start, size = centre - extent, 2 * extent + 1
    crop_image = torch.from_numpy(_crop_padded(image, start, size, -1.0).astype(np.float32))
    crop_label = torch.from_numpy(_crop_padded(label, start, size, BACKGROUND).astype(np.float32))
    offsets = torch.arange(patch_size, dtype=torch.float32) - half
    grid = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), dim=-1)
    source = grid @ torch.from_numpy(matrix.T.astype(np.float32)) + torch.from_numpy(extent).float()
    normalised = source / torch.from_numpy(size - 1).float() * 2 - 1
    normalised = normalised.flip(-1)[None]  # grid_sample wants (z, y, x) for a (X, Y, Z) tensor
    sampled = [
        F.grid_sample(
            crop[None, None], normalised, mode=mode, padding_mode="border", align_corners=True
        )[0, 0]
        for crop, mode in ((crop_image, "bilinear"), (crop_label, "nearest"))
    ]
    return sampled[0], sampled[1].to(torch.uint8)


@dataclass(frozen=True)
class PatchSettings:
    """How patches are drawn: the LabelSampler and RandomAffine settings of the config."""

    patch_size: int
    probabilities: dict[int, float]
    samples_per_volume: int
    augment: bool = True
    scales: tuple[float, float] = (0.9, 1.1)
    degrees: tuple[float, float] = (-10.0, 10.0)


class PatchSetDataset(tio.SubjectsDataset):
    """A SubjectsDataset whose item is one volume's patches, cut in the DataLoader worker.

    The item is a Subject whose ``image``/``label`` hold the patches as channels, shape
    (samples_per_volume, P, P, P); :class:`PackedPatchSampler` hands them to the Queue one by one.
    Cutting in the DataLoader workers keeps the main process free for the model.
    """

    def __init__(self, cached: Sequence[CachedCase], settings: PatchSettings, seed: int = 0):
        super().__init__([build_subject(c) for c in cached])
        self.settings = settings
        self.seed = seed

    def __getitem__(self, index: int) -> tio.Subject:
        subject = self._subjects[index]
        s = self.settings
        # Fresh randomness per draw and per worker, drawn from torch's RNG: reproducible from the
        # seed, and restored with it on resume, so a resumed run does not replay its patches.
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(
            [self.seed, index, int(torch.randint(2**31, ())), info.id if info else 0]
        )
        image = subject[IMAGE].data[0].numpy()
        label = subject[LABEL].data[0].numpy()
        spacing = subject[IMAGE].spacing
        centres = sample_centres(label, s.patch_size, s.probabilities, s.samples_per_volume, rng)
        patches = [
            extract_patch(
                image,
                label,
                centre,
                s.patch_size,
                random_affine_matrix(s.scales, s.degrees, spacing, rng) if s.augment else None,
            )
            for centre in centres
        ]
        affine = subject[IMAGE].affine
        return tio.Subject(
            {
                IMAGE: tio.ScalarImage(tensor=torch.stack([p[0] for p in patches]), affine=affine),
                LABEL: tio.LabelMap(tensor=torch.stack([p[1] for p in patches]), affine=affine),
                CASE_ID: subject[CASE_ID],
            }
        )


class PackedPatchSampler(tio.data.PatchSampler):
    """Yields the patches packed as channels by :class:`PatchSetDataset`, one Subject each."""

    def _generate_patches(
        self, subject: tio.Subject, num_patches: int | None = None
    ) -> Iterator[tio.Subject]:
        count = subject[IMAGE].data.shape[0]
        for i in range(count if num_patches is None else min(num_patches, count)):
            yield tio.Subject(
                {
                    IMAGE: tio.ScalarImage(
                        tensor=subject[IMAGE].data[i : i + 1], affine=subject[IMAGE].affine
                    ),
                    LABEL: tio.LabelMap(
                        tensor=subject[LABEL].data[i : i + 1], affine=subject[LABEL].affine
                    ),
                    CASE_ID: subject[CASE_ID],
                }
            )


def queue_ram_bytes(settings: PatchSettings, queue_length: int, num_workers: int) -> int:
    """Estimated RAM of the queue: its patches plus the patch sets in flight (float32 + uint8)."""
    per_patch = settings.patch_size**3 * (4 + 1)
    in_flight = max(num_workers, 1) * 2 * settings.samples_per_volume
    return per_patch * (queue_length + in_flight)


def build_loader(
    cached: Sequence[CachedCase],
    settings: PatchSettings,
    *,
    queue_length: int,
    batch_size: int,
    num_workers: int,
    seed: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """tio.SubjectsDataset -> LabelSampler-style patches -> tio.Queue -> DataLoader.

    Returns:
        A DataLoader yielding dicts with ``image`` (B, 1, P, P, P) float32 in (-1, 1),
        ``label`` (B, 1, P, P, P) uint8 and ``case_id``.
    """
    dataset = PatchSetDataset(cached, settings, seed=seed)
    queue = tio.Queue(
        dataset,
        max_length=max(queue_length, settings.samples_per_volume),
        samples_per_volume=settings.samples_per_volume,
        sampler=PackedPatchSampler(settings.patch_size),
        num_workers=num_workers,
        shuffle_subjects=True,
        shuffle_patches=True,
    )
    log.info(
        "patch queue: %d patches of %d^3 from %d volumes, about %.0f MB of RAM",
        queue_length,
        settings.patch_size,
        len(cached),
        queue_ram_bytes(settings, queue_length, num_workers) / 1e6,
    )
    return torch.utils.data.DataLoader(
        queue, batch_size=batch_size, num_workers=0, pin_memory=pin_memory
    )
